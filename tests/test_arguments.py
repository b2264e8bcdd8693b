"""The flag registry: each flag defined once, defaults from the config dataclasses, the scripts'
environment variables as defaults, and entry points that parse and preflight without
megatron-core."""
import dataclasses
import json
import subprocess
import sys

import pytest

from dist_utils import ROOT, clean_env
from post_training import arguments, config
from post_training.utils import UsageError

ENTRIES = ("acceptance", "convert", "evaluate", "export", "generate", "prune", "train", "quantize")  # quantize last (see below)


def test_each_flag_and_field_is_defined_once():
    flags = [f.flag for g in arguments.GROUPS.values() for f in g.flags]
    assert len(flags) == len(set(flags))
    for name, group in arguments.GROUPS.items():
        fields = {f.name for f in dataclasses.fields(group.cls)}
        assert {f.field for f in group.flags} <= fields, name
    # one home per config class: no class serves two groups
    classes = [g.cls for g in arguments.GROUPS.values()]
    assert len(classes) == len(set(classes))


def test_every_config_field_has_one_home():
    """Fields that several tasks use live in exactly one dataclass."""
    homes = {}
    for cls in (getattr(config, n) for n in dir(config) if n.endswith("Config")):
        for f in dataclasses.fields(cls):
            homes.setdefault(f.name, []).append(cls.__name__)
    for shared in ("seed", "seq_length", "micro_batch_size", "global_batch_size", "max_new_tokens",
                   "prompts_file", "json_out", "save", "load"):
        assert len(homes[shared]) == 1, (shared, homes[shared])


def test_defaults_come_from_the_dataclasses_and_env_and_overrides():
    args = arguments.parse([], ["runtime", "model", "generate"], prog="t", env={})
    assert args.model == config.ModelConfig() and args.generate == config.GenerateConfig()
    env = {"TP": "3", "MLM_MODEL_SAVE": "/x/save", "HF_MODEL_CKPT": "/x/hf"}
    args = arguments.parse(["--pretrained-model-path", "/y"], ["runtime", "source", "save"], prog="t", env=env)
    assert args.runtime.tp == 3 and args.save.save == "/x/save"
    assert args.source.pretrained_model_path == "/y"  # an explicit flag wins over the env
    args = arguments.parse(["--bf16"], ["model", "generate"], prog="t", env={},
                           defaults={"generate.max_new_tokens": 48})
    assert args.model.dtype == "bf16" and args.generate.max_new_tokens == 48
    with pytest.raises(UsageError, match="TP='x' is not a valid --tensor-model-parallel-size"):
        arguments.parse([], ["runtime"], prog="t", env={"TP": "x"})
    with pytest.raises(UsageError, match="--top-p must be in"):
        arguments.parse(["--top-p", "0"], ["generate"], prog="t", env={})


def test_help_lists_flags_and_environment(capsys):
    with pytest.raises(SystemExit):
        arguments.parse(["--help"], ["runtime", "source", "save"], prog="convert.sh", env={})
    out = capsys.readouterr().out
    for text in ("--tensor-model-parallel-size", "[env TP]", "--save", "[env MLM_MODEL_SAVE]",
                 "MLM_EXTRA_ARGS", "NNODES"):
        assert text in out


def test_entry_points_parse_and_preflight_without_megatron(tiny_llama):
    """Importing an entry point and preflighting its input imports neither megatron-core nor
    the model code (the launcher runs this before torchrun starts N ranks). One fresh process
    runs every entry's preflight in turn (quantize last: it imports ModelOpt, see below) and
    reports what each had loaded."""
    extra = {"export": ["--export-dir", "/tmp/nonexistent-export-dir"], "convert": ["--save", "/tmp/x"],
             "evaluate": ["--seq-length", "16", "--eval-max-chunks", "1"], "quantize": [],
             "prune": ["--prune-export-config", '{"num_layers": 2}', "--save", "/tmp/x"]}
    code = "import importlib, json, sys\nseen = {}\n"
    for m in ENTRIES:  # quantize is last
        code += (f"importlib.import_module('post_training.cli.{m}').main(['--preflight', "
                 f"'--pretrained-model-path', {str(tiny_llama)!r}] + {extra.get(m, [])!r})\n"
                 f"seen[{m!r}] = sorted(x for x in ('megatron', 'modelopt', 'post_training.model_builder') "
                 "if x in sys.modules)\n")
    code += "print(json.dumps(seen))\n"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert list(seen) == list(ENTRIES) and ENTRIES[-1] == "quantize"
    for m in ENTRIES:
        # quantize resolves its ModelOpt config name in the preflight, and importing ModelOpt's
        # quantization package imports megatron-core (its plugins); the model code stays out
        assert seen[m] == (["megatron", "modelopt"] if m == "quantize" else []), (m, seen[m])


def test_config_dtype_names_are_the_io_dtype_map():
    """config validates dtype names without importing torch; the one name -> dtype map is io's."""
    from post_training.io.formats import DTYPES

    assert set(config.DTYPE_NAMES) == set(DTYPES)
