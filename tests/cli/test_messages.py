"""Messages that send a user the right way: text where tokens belong, a token file where a
checkpoint belongs, a mistyped flag, -h, --version, and a missing GPU from the Python API."""

import numpy as np
import pytest
import torch

import lmtools
from lmtools.cli.app import closest_option, main
from lmtools.errors import DeviceError, LMToolsError
from prepared import documents, prepare, write_eot_text


def run_main(argv, capsys) -> tuple[int, str, str]:
    """The console script's entry point, in process."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def one_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("messages")
    prepare(
        write_eot_text(root / "corpus.txt", documents(100, 0)),
        root / "data",
        "--vocab_size",
        280,
        "--separator",
        "<|endoftext|>",
        "--val_fraction",
        0.1,
    )
    return root


def test_training_on_a_text_file_gives_the_prepare_command(data, capsys, tmp_path):
    line = one_error(
        *run_main(["train", "--train_data", data / "corpus.txt", "--checkpoint_path", tmp_path / "c.pt"], capsys)[::2]
    )
    assert "corpus.txt is text, not token data" in line and f"lmtools prepare {data / 'corpus.txt'} --out data" in line
    assert "dtype" not in line


def test_sampling_a_token_file_says_sample_needs_a_checkpoint(data, capsys):
    line = one_error(*run_main(["sample", data / "data" / "train.npy", "--prompt", "the"], capsys)[::2])
    assert "train.npy is a token file, not a checkpoint" in line and "sample needs a checkpoint" in line
    assert "pickled" not in line
    line = one_error(*run_main(["sample", data / "data", "--prompt", "the"], capsys)[::2])
    assert "is a prepared dataset folder, not a checkpoint" in line


@pytest.mark.parametrize(
    "typed, meant",
    [
        ("--lr", "--learning_rate"),
        ("--learning-rte", "--learning_rate"),
        ("--max_iter", "--max_iters"),
        ("--mlr", "--min_learning_rate"),
        ("--warmup", "--warmup_iters"),
        ("--batchsize", "--batch_size"),
        ("--ctx", None),
    ],
)
def test_an_unknown_flag_suggests_the_closest(typed, meant, capsys, tmp_path):
    code, _out, err = run_main(["train", typed, "1e-3", "--train_data", tmp_path / "x.npy"], capsys)
    line = one_error(code, err)
    assert f"no such option {typed}" in line
    if meant:
        assert f"did you mean {meant}?" in line
    else:
        assert "did you mean" not in line


def test_closest_option_prefers_the_documented_spelling():
    names = ["--learning_rate", "--learning-rate", "--min_learning_rate", "--min-learning-rate", "--help", "-h"]
    assert closest_option("--lr", names) == "--learning_rate"
    assert closest_option("--LR", names) == "--learning_rate"
    assert closest_option("--he", ["--help", "-h"]) is None


@pytest.mark.parametrize("argv", [["-h"], ["train", "-h"], ["prepare", "-h"], ["sample", "-h"]])
def test_h_is_help(argv, capsys):
    code, out, err = run_main(argv, capsys)
    assert code == 0 and "Usage:" in out and "--help" in out and err == ""


def test_version(capsys):
    code, out, _err = run_main(["--version"], capsys)
    assert code == 0 and out.strip() == f"lmtools {lmtools.__version__}"


def test_get_batch_on_a_missing_gpu_is_a_runtime_error_with_the_clear_message():
    data = np.arange(1000, dtype=np.uint16)
    with pytest.raises(RuntimeError) as info:
        lmtools.get_batch(data, 4, 8, device="cuda:99")
    assert isinstance(info.value, DeviceError) and isinstance(info.value, LMToolsError)
    if torch.cuda.is_available():
        assert "cuda:99" in str(info.value) and "CUDA device(s)" in str(info.value)
    else:
        assert "no usable CUDA GPU" in str(info.value)


def test_resuming_a_token_file_says_resume_needs_a_checkpoint(data, capsys):
    line = one_error(*run_main(["resume", data / "data" / "val.npy"], capsys)[::2])
    assert "val.npy is a token file, not a checkpoint" in line and "resume needs a checkpoint" in line
