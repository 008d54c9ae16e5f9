"""The training configs: `extends:` inheritance, and every config the docs name exists and loads."""
import re
from pathlib import Path

import pytest

from osdiff.errors import OSDiffError
from osdiff.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# configs/model/osdiff.yaml is the official OSDiff repository's model config, not one of ours
CONFIG_PATH = re.compile(r"configs/(?!model/)[\w./-]+?\.(?:yaml|yml|toml)")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_merges_mappings_replaces_lists_and_resolves_relative_paths(tmp_path):
    _write(tmp_path / "base.yaml", "seed: 3\nlosses: {rate_lambdas: [1.0, 2.0], latent_mse: 0.5, hint_mse: 2.0}\n"
           "stages: [{name: codec, steps: 7}, {name: codec, steps: 9}]\n")
    _write(tmp_path / "sub" / "mid.yaml", "extends: ../base.yaml\nlosses: {latent_mse: 0.25}\nthreads: 2\n")
    leaf = _write(tmp_path / "sub" / "deeper" / "leaf.yaml",
                  "extends: ../mid.yaml\nlosses: {rate_lambdas: [4.0]}\nstages: [{name: codec, steps: 5}]\n")
    cfg = load_config(leaf)
    assert (cfg.seed, cfg.threads) == (3, 2)  # from the grandparent and the parent
    assert cfg.losses.latent_mse == 0.25 and cfg.losses.hint_mse == 2.0  # mappings merge key by key
    assert cfg.losses.rate_lambdas == [4.0]  # lists are replaced, not merged
    assert [s.steps for s in cfg.stages] == [5]
    assert load_config(tmp_path / "sub" / "mid.yaml").stages[1].steps == 9


def test_extends_refuses_cycles_missing_files_and_bad_values(tmp_path):
    a = _write(tmp_path / "a.yaml", "extends: b.yaml\nseed: 1\n")
    _write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(OSDiffError, match=r"extends itself \(a.yaml -> b.yaml -> a.yaml\)"):
        load_config(a)
    me = _write(tmp_path / "me.yaml", "extends: me.yaml\n")
    with pytest.raises(OSDiffError, match="extends itself"):
        load_config(me)
    gone = _write(tmp_path / "gone.yaml", "extends: nowhere.yaml\n")
    with pytest.raises(OSDiffError, match="nowhere.yaml: no such config file"):
        load_config(gone)
    bad = _write(tmp_path / "bad.yaml", "extends: [a.yaml, b.yaml]\n")
    with pytest.raises(OSDiffError, match="extends must be one config file name"):
        load_config(bad)
    # a TOML file may extend a YAML one
    toml = _write(tmp_path / "t.toml", 'extends = "base.yaml"\nseed = 9\n')
    _write(tmp_path / "base.yaml", "threads: 4\nstages: [{name: codec, steps: 2}]\n")
    cfg = load_config(toml)
    assert (cfg.seed, cfg.threads, cfg.stages[0].steps) == (9, 4, 2)


def _named_config_paths() -> dict[str, set[str]]:
    files = [ROOT / "README.md", ROOT / "MODEL_CARD.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted(p for p in (ROOT / "scripts").iterdir() if p.is_file()),
             *sorted((ROOT / "configs").rglob("*.yaml"))]
    named: dict[str, set[str]] = {}
    for file in files:
        for path in CONFIG_PATH.findall(file.read_text()):
            named.setdefault(path, set()).add(str(file.relative_to(ROOT)))
    return named


def test_every_config_path_the_docs_name_exists():
    named = _named_config_paths()
    assert "configs/tiny-v3-cpu.yaml" in named and any("experiments/" in p for p in named)  # the scan finds them
    missing = {path: sorted(where) for path, where in named.items() if not (ROOT / path).is_file()}
    assert not missing, f"config paths named but absent: {missing}"


def test_every_config_loads():
    configs = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
    assert len(configs) >= 8 + 10
    for path in configs:
        try:
            load_config(path)
        except OSDiffError as exc:
            # an experiment that continues a run folder takes it from `--init-from`, which its
            # header documents; with it, it must load
            assert "needs init_from" in str(exc), f"{path.name}: {exc}"
            assert "--init-from" in path.read_text(), f"{path.name} needs init_from but its header gives no --init-from"
            load_config(path, init_from="model")
