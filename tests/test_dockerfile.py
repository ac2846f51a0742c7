"""The Dockerfile agrees with pyproject.toml (there is no Docker engine to build it here).

Checked against pyproject, parsed with tomllib: the base image's torch satisfies the torch
requirement, the build's Python guard is requires-python, the entrypoint is the console
script, installed extras exist, the files pyproject names are copied before the first
install; and the image runs as a non-root user with its logs in a
volume, with a build context that leaves out the venv and the logs.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from conftest import CONFIGS, REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def args_of(name: str) -> list[str]:
    return [value for key, value in instructions() if key == name]


def build_args() -> dict[str, str]:
    """Defaults of ARG NAME=value."""
    out = {}
    for value in args_of("ARG"):
        key, _, default = value.partition("=")
        out[key.strip()] = default.strip()
    return out


def base_image() -> str:
    (base,) = args_of("FROM")
    return re.sub(r"\$\{(\w+)\}", lambda m: build_args()[m.group(1)], base.split()[0])


def pip_installs() -> list[list[str]]:
    """The arguments of every `pip install` in a RUN, split like a shell would."""
    found = []
    for run in args_of("RUN"):
        lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word not in ("&&", "||", ";", "|"):
                command.append(word)
                continue
            if command[:2] == ["pip", "install"] or command[1:4] == ["-m", "pip", "install"]:
                found.append(command[command.index("install") + 1 :])
            command = []
    return found


def test_base_is_a_cuda_runtime_image_whose_torch_meets_pyproject():
    match = re.fullmatch(
        r"pytorch/pytorch:(?P<torch>[\d.]+)-cuda(?P<cuda>[\d.]+)-cudnn\d+-runtime", base_image()
    )
    assert match, f"expected a pytorch/pytorch CUDA runtime tag, got {base_image()}"
    (torch_req,) = [
        Requirement(r) for r in PYPROJECT["dependencies"] if Requirement(r).name == "torch"
    ]
    # Otherwise pip would replace the base's CUDA torch with whatever PyPI serves.
    assert Version(match["torch"]) in torch_req.specifier, (match["torch"], torch_req)


def test_python_guard_is_pyprojects_requires_python():
    (spec,) = SpecifierSet(PYPROJECT["requires-python"])
    assert spec.operator == ">="
    guards = [re.search(r"sys\.version_info >= \((\d+), (\d+)\)", r) for r in args_of("RUN")]
    (guard,) = [g for g in guards if g]
    assert Version(f"{guard[1]}.{guard[2]}") == Version(spec.version)


def test_entrypoint_is_the_console_script():
    (entrypoint,) = args_of("ENTRYPOINT")
    assert json.loads(entrypoint) == list(PYPROJECT["scripts"])
    assert list(PYPROJECT["scripts"]) == ["trainer"]


def test_the_project_is_installed_with_extras_that_exist():
    installs = pip_installs()
    targets = [w for words in installs for w in words if w == "." or w.startswith(".[")]
    assert targets, "the project itself (`pip install .`) is never installed"
    known = set(PYPROJECT.get("optional-dependencies", {}))
    for target in targets:
        named = re.search(r"\[(.*)\]", target)
        extras = {e.strip() for e in named[1].split(",") if e.strip()} if named else set()
        assert extras <= known, f"{target}: unknown extras {extras - known}; pyproject has {known}"


def test_runs_as_a_non_root_user_in_app_with_logs_in_a_volume():
    order = [key for key, _ in instructions()]
    users = args_of("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert order.index("USER") < order.index("ENTRYPOINT")
    assert args_of("WORKDIR")[-1] == "/app"
    volumes = [v for value in args_of("VOLUME") for v in shlex.split(value.strip("[]"))]
    assert "/app/logs" in [v.strip('",') for v in volumes]


def test_env_turns_off_albumentations_update_check():
    env = " ".join(args_of("ENV"))
    assert re.search(r"\bNO_ALBUMENTATIONS_UPDATE=1\b", env)


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def ignored(path: str) -> bool:
    return any(fnmatch.fnmatch(path, p) or path.startswith(p + "/") for p in dockerignore())


@pytest.mark.parametrize("path", [".venv", "logs", ".git", ".pytest_cache", ".ruff_cache"])
def test_build_context_leaves_out(path):
    assert ignored(path), f".dockerignore must exclude {path}"


def test_copied_paths_exist_and_are_in_the_build_context():
    for value in args_of("COPY"):
        words = [w for w in shlex.split(value) if not w.startswith("--")]
        for source in words[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
            assert not ignored(source), f"COPY {source}: excluded by .dockerignore"


def test_files_pyproject_names_are_copied_before_the_first_install():
    """``pip install .`` reads the readme and the license files pyproject names: they must be
    in the image by then (the dependency layer copies pyproject.toml before src/)."""
    named = [PYPROJECT["readme"], *PYPROJECT.get("license-files", [])]
    copied: list[str] = []
    for key, value in instructions():
        if key == "COPY":
            copied += [w for w in shlex.split(value) if not w.startswith("--")][:-1]
        if key == "RUN" and "pip install ." in value:
            break
    assert "pyproject.toml" in copied
    for path in named:
        assert path in copied, f"pyproject names {path}; COPY it before the first pip install"


def test_configs_find_their_data_in_the_image():
    needs_fashion = any(
        "/usr/share/datasets/fashion-mnist" in p.read_text() for p in CONFIGS.rglob("*.yaml")
    )
    if not needs_fashion:
        pytest.skip("no config reads Debian's Fashion-MNIST")
    assert any("dataset-fashion-mnist" in run for run in args_of("RUN"))
