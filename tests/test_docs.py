"""The docs name nothing that does not exist: every config field, `python -m` command, repository
path, `module.name` reference and metric key written in README.md and docs/*.md is checked
against the code (config fields against the schema, paths against the tree, commands and
references by import, metric keys against docs/run-dir.md's glossary and the source that logs
them). Figures are not checked here; the tests that compute them check the ones in configs."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import msgspec
import pytest
from glossary import documented_keys

from trustee.config import Config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH_ROOTS = ("trustee/", "configs/", "docs/", "tools/", "bench/", "examples/", "tests/")
METRIC_GROUPS = (
    "learn", "eval", "time", "memory", "engine", "status", "sim", "sched", "adv", "dynamic",
    "curriculum", "log", "health",
)  # fmt: skip
SECTIONS = {f.name for f in msgspec.structs.fields(Config)}
# Paths that a run or a command writes (they exist after it), named as such in the docs.
WRITTEN = ("runs/", ".cache/", "models/", "bench/results/prefix-", "runs/bench")


# Dotted names in the docs that are not trustee's config or code, each for a reason: vLLM's model
# object, the entry-point group name, the misspelt key of the README's config-error example.
FOREIGN = {"model.load_weights", "trustee.environments", "learner.lora_rnk"}
OTHER_PROJECTS = ("vllm", "peft", "transformers", "torch")


def spans(text: str, *, python_blocks: bool = True) -> list[str]:
    """Inline `code` spans and the lines of fenced blocks (Python examples optional: their
    dotted names are the example's own variables)."""
    out = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text)
    for lang, block in re.findall(r"```([a-z]*)\n(.*?)```", text, flags=re.S):
        if python_blocks or lang != "python":
            out += block.splitlines()
    return out


def config_field(dotted: str) -> bool:
    """Whether `a.b.c` is a field of the config tree (a table or a leaf)."""
    t: object = Config
    for part in dotted.split("."):
        if not (isinstance(t, type) and issubclass(t, msgspec.Struct)):
            return False
        fields = {f.name: f for f in msgspec.structs.fields(t)}
        if part not in fields:
            return False
        t = fields[part].type
    return True


def module_attr(dotted: str) -> bool:
    """Whether `mod.name` (or `pkg.mod.name`) is an attribute of trustee.<mod...>."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        mod = "trustee." + ".".join(parts[:cut])
        try:
            obj = importlib.import_module(mod)
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


FIELD = re.compile(r"(?<![\w./-])([a-z_]+(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?![\w/(-])")
PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(r) for r in PATH_ROOTS) + r")[\w./*<>-]*)")
MODULE = re.compile(r"python -m ([\w.]+)")
FILE = re.compile(r"\.(py|md|toml|json|jsonl|jinja|sh|txt|html|safetensors|pt|png)$")
PACKAGE_PATH = re.compile(r"(?<![\w./-])((?:[a-z_]+/)+[a-z_]+\.(?:py|jinja))")
METRIC = re.compile(r"(?<![\w./-])((?:" + "|".join(METRIC_GROUPS) + r")/[\w/<>=.{}-]*)")


def _mentions(*, python_blocks: bool = True) -> list[tuple[str, str]]:
    return [
        (d.relative_to(ROOT).as_posix(), s)
        for d in DOCS
        for s in spans(d.read_text(), python_blocks=python_blocks)
    ]


def _trustee_name(dotted: str) -> bool:
    """`trustee.x.y` as a module or an attribute of one."""
    try:
        if importlib.util.find_spec(dotted) is not None:
            return True
    except ModuleNotFoundError:  # `trustee.mod.Name`: a parent that is a module, not a package
        pass
    return module_attr(dotted.split(".", 1)[1])


def _is_trustee_module(name: str) -> bool:
    return any(
        importlib.util.find_spec(f"trustee.{pkg}{name}") is not None
        for pkg in ("", "learn.", "chat.", "engines.")
    )


def test_config_fields_and_references_named_in_the_docs_exist():
    """A dotted name whose first part is a config section must be a config field (or an
    attribute of the trustee module of that name: `placement.build_learner`); `trustee.x` must
    import; `module.name` for a trustee module must be an attribute of it."""
    bad = []
    for doc, s in _mentions(python_blocks=False):
        for m in FIELD.findall(s):
            m = m.rstrip(".")
            first = m.split(".")[0]
            if m in FOREIGN or re.search(r"\.(py|md|toml|json|jsonl|jinja|sh|txt|html|safetensors|pt)$", m):
                continue
            if first in SECTIONS:
                ok = config_field(m) or module_attr(m)
            elif first == "trustee":
                ok = _trustee_name(m)
            elif first in OTHER_PROJECTS:
                continue
            elif _is_trustee_module(first):
                ok = module_attr(m) or any(
                    module_attr(f"{pkg}{m}") for pkg in ("learn.", "chat.", "engines.")
                )
            else:
                continue  # another project's name (vllm.*, peft.*) or prose
            if not ok:
                bad.append(f"{doc}: `{m}` in `{s.strip()[:80]}`")
    assert not bad, "names in the docs that are neither config fields nor trustee attributes:\n" + "\n".join(
        bad
    )


def test_paths_named_in_the_docs_exist():
    bad = []
    for doc, s in _mentions():
        for m in PATH.findall(s):
            m = m.rstrip(".,:)")
            if m.startswith(WRITTEN) or "NNNNNN" in m or "<" in m:
                continue
            m = m.split("::")[0]
            if "*" in m:
                if not list(ROOT.glob(m)):
                    bad.append(f"{doc}: {m}")
            elif not (ROOT / m).exists() and not (ROOT / m.split(":")[0]).exists():
                bad.append(f"{doc}: {m}")
        for m in PACKAGE_PATH.findall(s):  # `learn/grpo.py`: a path inside the package
            if m.startswith(("vllm/", "path/to/")):  # the installed vLLM package's files; a placeholder
                continue
            if (
                not m.startswith(PATH_ROOTS)
                and not (ROOT / "trustee" / m).exists()
                and not (ROOT / m).exists()
            ):
                bad.append(f"{doc}: {m} (not under trustee/)")
    assert not bad, "paths in the docs that do not exist:\n" + "\n".join(bad)


def test_python_m_commands_in_the_docs_exist():
    bad = []
    for doc, s in _mentions():
        for mod in MODULE.findall(s):
            if mod.startswith(("trustee", "bench")) and importlib.util.find_spec(mod) is None:
                bad.append(f"{doc}: python -m {mod}")
            elif mod.startswith(("trustee", "bench")) and mod.count(".") == 0:
                continue
    assert not bad, "\n".join(bad)


def _glossary() -> tuple[set[str], list[re.Pattern]]:
    return documented_keys((ROOT / "docs" / "run-dir.md").read_text())


def _source() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "trustee").rglob("*.py"))


def test_metric_keys_named_anywhere_are_in_the_glossary():
    literal, patterns = _glossary()
    bad = []
    for doc, s in _mentions():
        if doc == "docs/run-dir.md":
            continue
        for m in METRIC.findall(s):
            m = m.rstrip(".,:")
            if "*" in m or m.endswith("/") or "{" in m or FILE.search(m):  # a group (`eval/*`) or a file
                continue
            if m not in literal and not any(p.match(m) for p in patterns) and "<" not in m:
                bad.append(f"{doc}: {m}")
    assert not bad, "metric keys named in the docs but not in docs/run-dir.md:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "key", sorted(_glossary()[0] & {m for _, s in _mentions() for m in METRIC.findall(s)})
)
def test_every_glossary_key_is_logged_by_the_code(key):
    from trustee.learn.learner import StepMetrics

    if key.endswith(("/", "*")):
        pytest.skip("a group")
    if key.startswith("learn/"):
        assert key.split("/", 1)[1] in {f.name for f in msgspec.structs.fields(StepMetrics)}, key
        return
    assert f'"{key}"' in _source() or f"'{key}'" in _source(), f"{key} is documented but nothing logs it"


def test_the_checks_catch_what_they_are_for():
    assert config_field("logging.trajectories") and not config_field("logging.save_trajectories")
    assert config_field("environment.tasks_file.reward_fn") and not config_field("model.adapters")
    assert module_attr("placement.build_learner") and not module_attr("placement.drive")
    assert FIELD.findall("set `grpo.kl_metric = true`") == ["grpo.kl_metric"]
    assert PATH.findall("see configs/1gpu-lora.toml") == ["configs/1gpu-lora.toml"]
    assert METRIC.findall("| `learn/ratio_min` |") == ["learn/ratio_min"]
    assert PACKAGE_PATH.findall("in `learn/grpo.py`") == ["learn/grpo.py"]


def test_the_vllm_serve_flags_in_gpu_md_are_the_installed_vllms():
    """docs/gpu.md cites the vLLM source for its serve flags; they are checked there."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vllm is not installed")
    pkg = Path(spec.origin).parent
    text = (ROOT / "docs" / "gpu.md").read_text()
    cli = (pkg / "entrypoints" / "launchers" / "cli_args.py").read_text()
    for flag in ("--enable-auto-tool-choice", "--tool-call-parser", "--default-chat-template-kwargs",
                 "--lora-modules", "--chat-template"):  # fmt: skip
        assert flag in text and flag[2:].replace("-", "_") in cli, flag
    assert "--enable-auto-tool-choice requires --tool-call-parser" in cli
    parsers = (pkg / "tool_parsers" / "__init__.py").read_text()
    for name in ("hermes", "llama3_json", "mistral"):
        assert f'"{name}"' in parsers and f"--tool-call-parser {name}" in text, name
    assert "max_lora_rank" in (pkg / "engine" / "arg_utils.py").read_text()
