"""The core contract on every device: `cpu` always, `cuda` when there is one (`make gpu-check`).

Each test builds its model on the device and checks the property there; on an accelerator it also
checks the result against the same computation on the CPU. The hot loops (reading, the
pretraining step, decoding) must never wait for the device: on CUDA they run under
`torch.cuda.set_sync_debug_mode("error")`, and on the CPU a profiler counts the ops that would
force a sync (`.item()`, `bool(tensor)`, `nonzero`), which must not grow with the work done.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import VOCAB, randomize_generator, tiny_model
from test_finetune import config as finetune_config
from test_finetune import episode_files  # noqa: F401 - a fixture
from test_finetune import fit as finetune_fit
from test_training import config as pretrain_config
from test_training import corpus_file  # noqa: F401 - a fixture
from test_training import fit as pretrain_fit

from genadapter import AdapterState, GenerativeAdapter, GeneratorConfig
from genadapter.eval.harness import ALL_METHODS
from genadapter.eval.methods import make_method
from genadapter.training.objectives import pretrain_losses

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
# ops that make the host wait for the device (on CUDA); on the CPU the profiler still sees them
SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero"}


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def make(device: torch.device, arch: str = "llama", **cfg) -> GenerativeAdapter:
    cfg = {"r": 4, "r_in": 6, "chunk_len": 8, **cfg}
    ga = GenerativeAdapter.from_base(tiny_model(arch), GeneratorConfig(**cfg))
    randomize_generator(ga)
    return ga.to(device)


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def close(a: AdapterState, b: AdapterState, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a.n.cpu(), b.n.cpu())
    for k in a.S:
        torch.testing.assert_close(a.S[k].cpu(), b.S[k].cpu(), rtol=tol, atol=tol)


def on_cpu(ga: GenerativeAdapter) -> GenerativeAdapter:
    return copy.deepcopy(ga).to("cpu")


# --- the core properties ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streaming_is_exact_and_states_add(device, arch):
    ga = make(device, arch)
    doc = ids(1, 32)
    whole = ga.read(doc)
    assert whole.device.type == device.type and whole.n.dtype == torch.float32
    one_by_one = ga.new_state()
    for chunk in doc.split(8, dim=1):
        one_by_one = ga.read(chunk, one_by_one)
    close(whole, one_by_one)
    a, b = doc[:, :16], doc[:, 16:]
    close(ga.read(a) + ga.read(b), whole)
    close(ga.read(torch.cat([a, b])).sum(), whole)
    close(ga.read(doc.to(device)), whole)  # ids already on the device read the same
    if device.type != "cpu":
        close(on_cpu(ga).read(doc), whole, tol=1e-4)


def test_side_path_matches_float64_and_merged_restores_w(device):
    ga = make(device, r=3, r_in=5)
    state = ga.read(ids(1, 40))
    x = ids(1, 13, seed=9).to(device)
    adapted = ga(x, state=state).logits
    # reference: a float64 CPU copy with W + dW written into the weights
    ref = on_cpu(ga).double()
    with torch.no_grad():
        for name, dW in ga.delta_weights(state).items():
            ref._modules_by_name[name].weight += dW.double().cpu()
        want = ref.base_model(x.cpu()).logits
    rel = (adapted.double().cpu() - want).norm() / want.norm()
    assert rel < 1e-5, rel
    before = {k: v.clone() for k, v in ga.base_model.state_dict().items()}
    with ga.merged(state):
        merged = ga(x).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    after = ga.base_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # bit-exact


def test_peft_export_reproduces_the_side_path(device, tmp_path):
    from peft import PeftModel

    ga = make(device)
    state = ga.read(ids(1, 30))
    x = ids(2, 12, seed=4).to(device)
    adapted = ga(x, state=state.repeat(2)).logits
    ga.export_lora(state, tmp_path / "lora")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(ga.base_model), tmp_path / "lora")
    with torch.no_grad():
        got = peft_model.to(device)(input_ids=x).logits
    assert ((got - adapted).norm() / adapted.norm()) < 1e-4


def test_read_and_generate_text(device, smollm2_tokenizer, tmp_path):
    model = tiny_model("llama", vocab=len(smollm2_tokenizer), init_range=0.5)
    ga = GenerativeAdapter.from_base(
        model, GeneratorConfig(r=4, r_in=4, chunk_len=8), tokenizer=smollm2_tokenizer
    )
    randomize_generator(ga)
    ga.to(device)
    docs = ["Zorblat is a town on the river Quenn.", "Its mayor is Ada Pell."]
    state = ga.read(docs)
    lengths = [len(smollm2_tokenizer(d, add_special_tokens=False).input_ids) for d in docs]
    assert state.device.type == device.type and state.n.tolist() == lengths
    one = state.sum()
    text = ga.generate("Who is the mayor?", state=one, chat=True, max_new_tokens=4)
    with ga.merged(one):
        merged = ga.generate("Who is the mayor?", chat=True, max_new_tokens=4)
    assert isinstance(text, str) and text == merged
    one.save(tmp_path / "s.safetensors")  # states save from any device, load where asked
    assert AdapterState.load(tmp_path / "s.safetensors", device=str(device)).equal(one)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_eval_methods(device, name, smollm2_tokenizer):
    model = tiny_model("llama", vocab=len(smollm2_tokenizer)).to(device)
    ga = None
    if name == "genadapter":
        ga = GenerativeAdapter.from_base(
            model, GeneratorConfig(r=4, r_in=4, chunk_len=16), smollm2_tokenizer
        )
    options = {"steps": 2, "lr": 1e-2} if name.startswith("ttt-") else {}
    method = make_method(name, model, smollm2_tokenizer, ga=ga, max_new_tokens=3, **options)
    context = ["Alice lives in Paris. She works as a doctor.", "Bob sells bread in Rome."]
    with method.adapt(context) as adapted:
        assert isinstance(adapted.answer("Where does Alice live?"), str)
        assert adapted.answer_nll("Where does Alice live?", "Paris") > 0
        assert len(adapted.score_options("Where?", ["Paris", "Rome"])) == 2


# --- training steps (Lightning, on the device) --------------------------------------------------
def accelerator(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


def test_pretraining_step(device, tmp_path, tiny_dir, corpus_file):  # noqa: F811
    cfg = pretrain_config(tmp_path, tiny_dir, corpus_file, trainer__accelerator=accelerator(device))
    model, trainer = pretrain_fit(cfg, "--trainer.max_steps", "2")
    assert trainer.global_step == 2 and model.ga.device.type == device.type
    assert any(b.B.abs().sum() > 0 for b in model.ga.generator.blocks.values())
    assert not any(p.requires_grad for p in model.ga.base_model.parameters())


def test_finetuning_step(device, tmp_path, tiny_dir, episode_files):  # noqa: F811
    cfg = finetune_config(
        tmp_path, tiny_dir, episode_files, accelerator=accelerator(device), max_steps=3
    )
    model, trainer = finetune_fit(cfg)  # batches 1, 2: episodes; 3: a pretraining batch
    assert trainer.global_step == 3 and model.ga.device.type == device.type
    assert any(b.B.abs().sum() > 0 for b in model.ga.generator.blocks.values())


# --- no syncs in the hot loops ----------------------------------------------------------------
def training_batch(D: int, T: int = 4, C: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    x = ids(D, T * C, seed=D).view(D, T, C)
    mask = torch.ones_like(x)
    mask[0, -1, 3:] = 0  # a short last chunk, and a document with one chunk fewer
    mask[-1, -1] = 0
    return x, mask


def step(ga, opt, x, mask) -> None:
    """One pretraining step as `GeneratorPretraining.training_step` runs it (batch on the device,
    its mask's host copy kept by `transfer_batch_to_device`)."""
    opt.zero_grad(set_to_none=True)
    out = pretrain_losses(
        ga,
        x.to(ga.device),
        mask.to(ga.device),
        2,
        0.5,
        torch.Generator().manual_seed(0),
        host_mask=mask,
    )
    out["loss"].backward()
    opt.step()


def decode(ga, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with a KV cache, the token staying on the device (no `.item()`)."""
    out = ga.base_model(input_ids=prompt, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = ga.base_model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return token


def sync_ops(fn) -> int:
    """How many ops `fn` runs that would make the host wait for an accelerator."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in SYNC_OPS)


def test_hot_loops_sync_a_constant_number_of_times_on_cpu():
    ga = make(torch.device("cpu"))
    ga.chunk_batch_size = 2
    with torch.no_grad():
        reads = [sync_ops(lambda n=n: ga.read(ids(3, n))) for n in (16, 96)]  # 3 vs 18 forwards
    assert reads[0] == reads[1], reads
    state = ga.read(ids(1, 40))
    prompt = ids(1, 6)
    with torch.no_grad(), ga.adapted(state):
        decoding = [sync_ops(lambda n=n: decode(ga, prompt, n)) for n in (2, 12)]
    assert decoding == [0, 0], decoding  # the side path adds no sync per token
    opt = torch.optim.AdamW(ga.generator.parameters(), lr=1e-3)
    steps = [sync_ops(lambda D=D: step(ga, opt, *training_batch(D))) for D in (2, 6)]
    assert steps[0] == steps[1], steps  # target planning only: host work on the host mask


@contextlib.contextmanager
def no_syncs():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@CUDA
def test_hot_loops_never_sync_on_cuda():
    ga = make(torch.device("cuda"))
    ga.chunk_batch_size = 2
    doc, prompt = ids(3, 96), ids(1, 6).cuda()
    opt = torch.optim.AdamW(ga.generator.parameters(), lr=1e-3)
    step(ga, opt, *training_batch(4))  # warm-up: kernels, then the fingerprint of these weights
    with torch.no_grad():
        state = ga.read(doc).select(0)
    with no_syncs(), torch.no_grad():
        ga.read(doc)
    with torch.no_grad(), ga.adapted(state), no_syncs():
        decode(ga, prompt, 8)
    with no_syncs():
        step(ga, opt, *training_batch(4))
