"""README.md, docs/ and examples/: generated pages up to date, links that resolve, configs that load.

Imports only preftune.config (and docs/gen_config.py by path), so these checks run even while
other modules are being changed."""

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"

README_LIMIT = 15_000
INTERNAL_NAMES = re.compile(r"seed 0|seed note|design note", re.IGNORECASE)


def _gen_config():
    spec = importlib.util.spec_from_file_location("gen_config", DOCS / "gen_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_md_is_generated_from_the_config():
    expected = _gen_config().generate()
    current = (DOCS / "config.md").read_text(encoding="utf-8")
    assert current == expected, "docs/config.md is out of date: run .venv/bin/python docs/gen_config.py"


def test_config_md_lists_every_key_and_alias():
    from preftune.config import ALIASES, TrainConfig

    text = (DOCS / "config.md").read_text(encoding="utf-8")
    for f in dataclasses.fields(TrainConfig):
        assert f"| `{f.name}` |" in text, f.name
    for alias, key in ALIASES.items():
        assert f"| `{alias}` | `{key}` |" in text, alias
    assert "mixed_precision" in text


def test_gen_config_groups_by_section_markers():
    gen = _gen_config()

    @dataclasses.dataclass
    class Sample:
        first: int = 0  # before any marker: general
        # --- model (preftune/models.py) ---
        second: int = 1
        # LoRA, freeze and QLoRA (a comment, not a section)
        third: int = 2
        # --- data -----------------------------------------
        fourth: int = 3

    groups = [(title, [f.name for f in fields]) for title, fields in gen.sections(Sample)]
    assert groups == [("General", ["first"]), ("Model", ["second", "third"]), ("Data", ["fourth"])]


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8"))
    assert n <= README_LIMIT, f"README.md has {n} characters; the limit is {README_LIMIT}"


def test_readme_starts_with_the_two_make_commands():
    text = README.read_text(encoding="utf-8")
    first_block = text.split("```", 2)[1]
    assert "make demo" in first_block and "make test" in first_block


@pytest.mark.parametrize("path", [README, *sorted(DOCS.glob("*.md")), *sorted(p for p in EXAMPLES.iterdir() if p.is_file())],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_internal_design_note_names(path):
    hits = [line for line in path.read_text(encoding="utf-8").splitlines() if INTERNAL_NAMES.search(line)]
    assert not hits, f"{path.relative_to(ROOT)}: {hits}"


def test_readme_links_point_at_files():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(((?:docs|examples|benchmarks)/[^)#\s]*)", text)
    assert links, "README.md links no docs"
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, missing


def test_docs_links_point_at_files():
    for page in DOCS.glob("*.md"):
        for link in re.findall(r"\]\(([^)#\s:]+\.md)", page.read_text(encoding="utf-8")):
            assert (page.parent / link).is_file(), f"{page.name}: {link}"


@pytest.mark.parametrize("name", ["dpo.yaml", "lora.yaml"])
def test_example_configs_load(name):
    from preftune.config import load_config

    cfg = load_config(str(EXAMPLES / name))
    assert cfg.model_name_or_path and cfg.dataset and cfg.output_dir
