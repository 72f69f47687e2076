"""`train --init_from FOLDER` on a damaged Hugging Face Llama folder: a real folder saved by
transformers, then broken one way per row (config.json, the shard index, the tensors), and the
real CLI run on it. Each row must end in exit 2 and one `error:` line naming the problem, within
seconds, with no traceback and no checkpoint written; the folder is imported exactly or not at
all. The runaway sizes (10^8 layers) run in a process whose address space is capped."""

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import PROCESS_ENV, one_line_error, run_cli
from models import save_llama

SECONDS = 5  # what one refusal may take, in this process (no interpreter start-up)
MEMORY_CAP = 4 << 30  # the capped process's address space; a working run needs under 1 GiB
PEAK_RSS = 2 << 30  # the refusal's resident peak, start-up included


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random LlamaForCausalLM saved by transformers (2 layers, width 48, 4 heads, vocab 97),
    copied for each test before it is damaged."""
    folder = tmp_path_factory.mktemp("llama") / "hf"
    save_llama(folder)
    return folder


# ---- ways to damage a folder ---------------------------------------------------------------------


def edit_config(change):
    """A damage that rewrites config.json with `change(config)` (which edits it in place)."""

    def damage(folder):
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))

    return damage


def set_config(**values):
    return edit_config(lambda config: config.update(values))


def drop_config(key):
    return edit_config(lambda config: config.pop(key))


def set_raw(key, text):
    """config.json with `key`'s value replaced by raw JSON text (what json.dumps cannot write)."""

    def damage(folder):
        config = json.loads((folder / "config.json").read_text())
        config[key] = "@@"
        (folder / "config.json").write_text(json.dumps(config).replace('"@@"', text))

    return damage


def pad_config(size):
    """config.json, still valid, padded with `size` bytes of white space."""

    def damage(folder):
        with open(folder / "config.json", "a") as f:
            f.write(" " * size)

    return damage


def write_config_text(text):
    def damage(folder):
        (folder / "config.json").write_text(text)

    return damage


def edit_tensors(change):
    """A damage that rewrites model.safetensors with `change(tensors)` (a dict it edits in place)."""

    def damage(folder):
        tensors = load_file(folder / "model.safetensors")
        change(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    return damage


def add_tensor(name, tensor):
    return edit_tensors(lambda tensors: tensors.update({name: tensor}))


def retype(name, dtype):
    return edit_tensors(lambda tensors: tensors.update({name: tensors[name].to(dtype)}))


def all_to(dtype):
    return edit_tensors(lambda tensors: tensors.update({k: v.to(dtype) for k, v in tensors.items()}))


def reshape(name, shape):
    return add_tensor(name, torch.zeros(shape))


def shard(folder, where=lambda name: name):
    """Split model.safetensors into two shards and an index, as save_pretrained shards a model;
    `where(file name)` is what the index records for each shard (a path to damage it)."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, folder / file, metadata={"format": "pt"})
        weight_map |= {k: where(file) for k in part}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def sharded_index(change):
    """A sharded folder whose index is rewritten with `change(index)` (which returns the new one)."""

    def damage(folder):
        shard(folder)
        path = folder / "model.safetensors.index.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return damage


def shard_outside(where):
    """A sharded folder whose index names its first shard by `where(folder, file)`: a path that
    leaves the folder (the shard itself is moved there, so following the path would work)."""

    def damage(folder):
        first = "model-00001-of-00002.safetensors"
        shard(folder, lambda file: where(folder, file) if file == first else file)
        os.replace(folder / first, folder.parent / first)

    return damage


def duplicate_across_shards(name):
    """A sharded folder in which `name` is also held, with other values, by the other shard."""

    def damage(folder):
        shard(folder)
        for file in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
            tensors = load_file(folder / file)
            if name not in tensors:
                tensors[name] = torch.ones(48)
                save_file(tensors, folder / file, metadata={"format": "pt"})

    return damage


NESTED = '{"model_type": "llama", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
LONG_INT = "1" + "0" * 5000

# (id, damage, a substring the error line must hold). Every row failed before this suite: a
# traceback, a hang or a runaway allocation, or a silently different model.
CASES = [
    # config.json of the wrong shape or types
    ("config-is-a-list", write_config_text("[1, 2, 3]"), "not a JSON object"),
    ("hidden_size-null", set_config(hidden_size=None), "config.json: hidden_size"),
    ("hidden_size-missing", drop_config("hidden_size"), "config.json: hidden_size"),
    ("vocab_size-missing", drop_config("vocab_size"), "config.json: vocab_size"),
    ("rms_norm_eps-not-a-number", set_config(rms_norm_eps="tiny"), "config.json: rms_norm_eps"),
    ("heads-not-a-number", set_config(num_attention_heads="four"), "config.json: num_attention_heads"),
    ("nested-10^5-deep", write_config_text(NESTED), "nested too deep"),
    ("integer-of-5000-digits", set_raw("vocab_size", LONG_INT), "too many digits"),
    ("hidden_size-Infinity", set_raw("hidden_size", "Infinity"), "config.json: hidden_size"),
    ("vocab_size-NaN", set_raw("vocab_size", "NaN"), "config.json: vocab_size"),
    ("zero-heads", set_config(num_attention_heads=0), "config.json: num_attention_heads"),
    ("rope_scaling-a-list", set_config(rope_scaling=["linear", 2.0]), "config.json: rope_scaling"),
    ("rope_scaling-a-string", set_config(rope_scaling="linear"), "config.json: rope_scaling"),
    ("rope_parameters-a-list", set_config(rope_parameters=[2000.0]), "config.json: rope_parameters"),
    ("rope_parameters-a-string", set_config(rope_parameters="default"), "config.json: rope_parameters"),
    (
        "rope_theta-in-rope_parameters-a-string",
        set_config(rope_parameters={"rope_type": "default", "rope_theta": "2000"}),
        "config.json: rope_parameters.rope_theta",
    ),
    ("config.json-of-20-MiB", pad_config(20 << 20), "MiB"),
    # sizes beyond lmtools' own bounds, refused before anything is built
    ("layers-10^6", set_config(num_hidden_layers=10**6), "config.json: num_hidden_layers"),
    ("layers-10^8", set_config(num_hidden_layers=10**8), "config.json: num_hidden_layers"),
    ("vocab-beyond-bound", set_config(vocab_size=1 << 30), "config.json: vocab_size"),
    # numbers that are not what transformers writes
    ("hidden_size-64.5", set_config(hidden_size=64.5), "config.json: hidden_size"),
    ("hidden_size-48.0", set_config(hidden_size=48.0), "config.json: hidden_size"),
    ("hidden_size-a-string", set_config(hidden_size="48"), "config.json: hidden_size"),
    ("layers-true", set_config(num_hidden_layers=True), "config.json: num_hidden_layers"),
    ("tie_word_embeddings-a-string", set_config(tie_word_embeddings="false"), "config.json: tie_word_embeddings"),
    (
        "rope_theta-negative",
        set_config(rope_parameters={"rope_type": "default", "rope_theta": -2000.0}),
        "config.json: rope_parameters.rope_theta",
    ),
    (
        "rope_theta-NaN",
        set_raw("rope_parameters", '{"rope_type": "default", "rope_theta": NaN}'),
        "config.json: rope_parameters.rope_theta",
    ),
    ("rope_theta-Infinity", set_raw("rope_theta", "Infinity"), "config.json: rope_theta"),
    # the shard index
    ("index-a-list", sharded_index(lambda index: [index]), "index"),
    ("weight_map-null", sharded_index(lambda index: index | {"weight_map": None}), "weight_map"),
    (
        "weight_map-to-numbers",
        sharded_index(lambda index: index | {"weight_map": dict.fromkeys(index["weight_map"], 1)}),
        "weight_map",
    ),
    ("shard-absolute-path", shard_outside(lambda folder, file: str(folder.parent / file)), "not a file name"),
    ("shard-dot-dot", shard_outside(lambda folder, file: f"../{file}"), "not a file name"),
    (
        "shard-etc-passwd",
        sharded_index(lambda index: index | {"weight_map": {"x": "../../etc/passwd"}}),
        "not a file name",
    ),
    ("tensor-in-two-shards", duplicate_across_shards("model.norm.weight"), "model.norm.weight"),
    # tensors that are not the config's Llama
    ("bias-tensor", add_tensor("model.layers.0.self_attn.q_proj.bias", torch.zeros(48)), "q_proj.bias"),
    ("extra-tensor", add_tensor("model.layers.0.mlp.gate_proj.scale", torch.ones(1)), "gate_proj.scale"),
    ("layer-beyond-config", add_tensor("model.layers.2.input_layernorm.weight", torch.ones(48)), "layers.2"),
    ("integer-weights", retype("model.norm.weight", torch.int32), "model.norm.weight"),
    ("all-int8-weights", all_to(torch.int8), "int8"),
    ("float64-weights", all_to(torch.float64), "float64"),
    ("wrong-shape-up_proj", reshape("model.layers.1.mlp.up_proj.weight", (81, 48)), "(81, 48)"),
    ("wrong-shape-q_proj", reshape("model.layers.0.self_attn.q_proj.weight", (44, 48)), "q_proj.weight"),
    ("wrong-shape-norm", reshape("model.norm.weight", (48, 1)), "model.norm.weight"),
]
# Rows whose old behaviour was to allocate without bound: run in a process with a capped address space.
RUNAWAY = {"layers-10^8"}


def train_args(folder, tokens):
    return ["train", "--init_from", folder, "--train_data", tokens, "--max_iters", 1, "--batch_size", 2]


def capped_run(args, tmp_path) -> tuple[subprocess.CompletedProcess, float, int]:
    """`lmtools ARGS` in a process capped at MEMORY_CAP of address space and 60 s of CPU:
    (its result, its wall time, its own peak resident bytes, from the rusage of its exit)."""

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
        resource.setrlimit(resource.RLIMIT_CPU, (60, 60))

    cmd = [sys.executable, "-m", "lmtools.cli", *map(str, args)]
    start = time.perf_counter()
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=PROCESS_ENV, preexec_fn=cap)
        killer = threading.Timer(120, proc.kill)  # a hang that sleeps rather than spins
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = subprocess.CompletedProcess(
        cmd, proc.returncode, (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    )
    return result, time.perf_counter() - start, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


@pytest.mark.parametrize("damage, needle", [pytest.param(d, n, id=i) for i, d, n in CASES])
def test_a_damaged_folder_is_refused_in_one_line(request, llama, tokens, tmp_path, damage, needle):
    folder = tmp_path / "hf"
    shutil.copytree(llama, folder)
    damage(folder)
    out = tmp_path / "run"
    args = [*train_args(folder, tokens), "--checkpoint_path", out / "ckpt.pt"]
    if request.node.callspec.id in RUNAWAY:
        result, seconds, peak = capped_run(args, tmp_path)
        assert peak < PEAK_RSS, f"peak resident memory {peak / 2**20:,.0f} MiB"
        limit = 60  # interpreter start-up and the import of torch included
    else:
        start = time.perf_counter()
        result = run_cli(*args)
        seconds, limit = time.perf_counter() - start, SECONDS
    line = one_line_error(result, needle)
    assert seconds < limit, f"{seconds:.1f} s to refuse: {line}"
    assert not out.exists(), "a refused run wrote into its checkpoint folder"


def test_an_undamaged_folder_and_its_sharded_copy_import_and_train(llama, tokens, tmp_path):
    for name, damage in (("whole", lambda folder: None), ("sharded", shard)):
        folder = tmp_path / name
        shutil.copytree(llama, folder)
        damage(folder)
        ckpt = tmp_path / f"{name}.pt"
        result = run_cli(*train_args(folder, tokens), "--checkpoint_path", ckpt)
        assert result.exit_code == 0, (result.output, result.stderr)
        assert f"Initialised from Hugging Face folder {folder}" in result.output and ckpt.is_file()
