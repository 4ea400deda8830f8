import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models():
    """A float64 tiny student and a wider teacher with another EOS, and the tokenizer (test_microbatch,
    test_lora)."""
    from helpers import tiny_model

    torch.manual_seed(0)
    student, tok = tiny_model(scale=3.0)
    teacher, _ = tiny_model(eos="<|im_end|>", hidden=48, seed=1, scale=3.0)
    return student.double(), teacher.double(), tok
