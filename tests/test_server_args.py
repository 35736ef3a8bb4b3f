"""ServerArgs: the parser generated from it, EngineConfig derived from it, one default per knob."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from lightllm.engine.protocol import EngineConfig
from lightllm.server.args import ServerArgs, build_parser, parse_args


def test_every_field_is_a_flag_with_help_and_the_parser_defaults_are_the_dataclass_defaults(monkeypatch):
    monkeypatch.delenv("LIGHTLLM_CPU_KERNELS", raising=False)
    monkeypatch.delenv("LIGHTLLM_ENGINE_THREADS", raising=False)
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    names = [f.name for f in dataclasses.fields(ServerArgs)]
    assert sorted(flags) == sorted(names)
    assert all(flags[n].help for n in names), [n for n in names if not flags[n].help]
    assert vars(parser.parse_args([])) == dataclasses.asdict(ServerArgs())
    assert parse_args([]) == ServerArgs()


def test_engine_config_is_derived_with_the_cli_defaults(monkeypatch):
    monkeypatch.delenv("LIGHTLLM_CPU_KERNELS", raising=False)
    monkeypatch.delenv("LIGHTLLM_ENGINE_THREADS", raising=False)
    cfg = parse_args([]).engine_config("/m")
    # the defaults that used to disagree between the CLI and the engine
    assert (cfg.spec_ngram_tokens, cfg.spec_max_decodes, cfg.quant_type) == (5, 1, "auto")
    assert cfg == EngineConfig(model_path="/m")  # one default per knob: EngineConfig's are the flags'
    fed = {f.metadata["engine"] for f in dataclasses.fields(ServerArgs) if f.metadata["engine"]}
    # every engine knob but the model path (resolved at start) and the device (chosen by the engine) is a flag
    assert fed == {f.name for f in dataclasses.fields(EngineConfig)} - {"model_path", "device"}


def test_flags_reach_the_engine_config():
    args = parse_args(["--spec_ngram_tokens", "0", "--spec_max_decodes", "3", "--quant_type", "int8wo",
                       "--output_constraint_mode", "none", "--eos_id", "2", "7", "--no-cpu_kernels",
                       "--engine_threads", "3", "--tp", "2", "--disable_chunked_prefill"])
    cfg = args.engine_config("/m")
    assert (cfg.spec_ngram_tokens, cfg.spec_max_decodes, cfg.quant_type, cfg.grammar_backend) == (0, 3, "int8wo", "none")
    assert (cfg.eos_id, cfg.cpu_kernels, cfg.engine_threads, cfg.tp, cfg.disable_chunked_prefill) == ([2, 7], False, 3, 2, True)
    assert parse_args(["--cpu_kernels"]).engine_config("/m").cpu_kernels is True


def test_environment_fallbacks_for_kernels_and_threads(monkeypatch):
    monkeypatch.setenv("LIGHTLLM_CPU_KERNELS", "0")
    monkeypatch.setenv("LIGHTLLM_ENGINE_THREADS", "4")
    assert (parse_args([]).cpu_kernels, parse_args([]).engine_threads) == (False, 4)
    # the flag wins over the environment
    assert parse_args(["--cpu_kernels", "--engine_threads", "2"]).engine_config("/m").cpu_kernels is True
    assert parse_args(["--engine_threads", "2"]).engine_threads == 2


def test_public_dict_hides_secrets():
    args = parse_args(["--api_key", "s3cret"])
    shown = args.public_dict()
    assert "api_key" not in shown and "s3cret" not in repr(shown)
    assert shown["spec_ngram_tokens"] == 5 and shown["cpu_kernels"] in (True, False)


@pytest.mark.parametrize("argv, message", [
    (["--spec_ngram_tokens", "-1"], "--spec_ngram_tokens"),
    (["--tp", "3", "--nnodes", "2"], "multiple of --nnodes"),
    (["--node_rank", "1"], "--node_rank"),
    (["--engine_threads", "0"], "--engine_threads"),
])
def test_bad_combinations_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        parse_args(argv)


def test_help_lists_every_knob():
    out = subprocess.run([sys.executable, "-m", "lightllm.server.api_server", "--help"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    for f in dataclasses.fields(ServerArgs):
        assert f"--{f.name}" in out, f.name
    assert "(default: 5)" in out  # defaults are shown


def test_server_info_renders_every_argument_but_the_key(smol_server):
    import requests

    from tests.conftest import API_KEY

    r = requests.get(smol_server.base_url + "/get_server_info", headers={"Authorization": f"Bearer {API_KEY}"},
                     timeout=10)
    info = r.json()
    for f in dataclasses.fields(ServerArgs):
        assert (f.name in info) != f.metadata["secret"], f.name
    assert API_KEY not in r.text
    assert info["spec_ngram_tokens"] == 5 and info["quant_type"] == "none" and info["cpu_kernels"] is True
