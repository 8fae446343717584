"""`python3 -m vllm.entrypoints.openai.api_server`, the older way to start vLLM's server.

Runs the stand-in with the same arguments, so a compose command written that way works
with the stand-in image as with the real one.
"""

import runpy

runpy.run_path("/app/standin.py", run_name="__main__")
