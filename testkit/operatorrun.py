"""The real operator in-process, against the kmock API, and a DVC repo with moving tags.

`running_operator(settings)` starts `datapin_operator.main.run` (kopf with every handler, and
the webhook server when the settings ask for one) and always stops it on the way out.
`tagged_repo()` builds a git repository whose two commits hold the `data.dvc` files real DVC
wrote for revisions A and B, tagged v1 and v2, so resolution walks real git history to pins
whose objects really are in the S3 server.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from datapin_operator.main import App, build_app, run
from datapin_operator.settings import Settings

from testkit.dvcremote import S3DvcFixture
from testkit.dvcrepo import run_git


@contextlib.asynccontextmanager
async def running_operator(settings: Settings) -> AsyncIterator[App]:
    """The operator in a thread with its own event loop: kopf, on stopping, cancels every
    task created after it started, which would include the test's own tasks."""
    app = build_app(settings)
    started = threading.Event()
    failure: list[BaseException] = []
    control: dict[str, Any] = {}

    def main() -> None:
        async def body() -> None:
            stop, ready = asyncio.Event(), asyncio.Event()
            control["loop"], control["stop"] = asyncio.get_running_loop(), stop
            task = asyncio.create_task(run(app, stop=stop, ready=ready))
            waiter = asyncio.create_task(ready.wait())
            await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
            started.set()
            await task

        try:
            asyncio.run(body())
        except BaseException as exc:  # reported to the test below
            failure.append(exc)
        finally:
            started.set()

    thread = threading.Thread(target=main, name="operator", daemon=True)
    thread.start()
    try:
        await asyncio.to_thread(started.wait, 30)
        if failure or not thread.is_alive():
            raise AssertionError(f"the operator did not start: {failure!r}")
        yield app
    finally:
        if "loop" in control and thread.is_alive():
            control["loop"].call_soon_threadsafe(control["stop"].set)
        await asyncio.to_thread(thread.join, 30)
        app.kube.close()
        if thread.is_alive():
            raise AssertionError("the operator did not stop within 30 s")
        if failure and not isinstance(failure[0], asyncio.CancelledError):
            raise AssertionError(f"the operator failed: {failure[0]!r}") from failure[0]


def tagged_repo(root: Path, a: S3DvcFixture, b: S3DvcFixture) -> tuple[Path, str, str]:
    """(repo, commit of v1, commit of v2): `data.dvc` as real DVC wrote it for A, then B."""
    repo = root / "dataset-repo"
    repo.mkdir(parents=True)
    run_git(repo, "init", "-q", "--initial-branch=main")
    run_git(repo, "config", "user.name", "datapin tests")
    run_git(repo, "config", "user.email", "tests@datapin.invalid")
    run_git(repo, "config", "commit.gpgsign", "false")
    commits = []
    for fx, tag in ((a, "v1"), (b, "v2")):
        shutil.copyfile(fx.dvc.dvc_file, repo / "data.dvc")
        run_git(repo, "add", "data.dvc")
        run_git(repo, "commit", "-q", "-m", f"data at {tag}")
        run_git(repo, "tag", tag)
        commits.append(run_git(repo, "rev-parse", "HEAD").stdout.strip())
    return repo, commits[0], commits[1]
