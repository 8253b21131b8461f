"""Chat messages render with the model's own template exactly as transformers renders them."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import InvalidRequest
from core.request import ChatMessage, Limits, validate
from model.tokenizer import Tokenizer

# SmolLM2-135M-Instruct's template (ChatML with a default system turn), verbatim.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3 style: BOS written by the template, whitespace control, roles that must alternate.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if loop.index0 > 0 and (message['role'] == 'user') == (loop.previtem['role'] == 'user')"
    " %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Whitespace control and tojson as Qwen-style templates use them.
BLOCKS = (
    "{%- for m in messages %}\n"
    "    {%- if m.role == 'system' %}\n<<SYS {{ m.content | tojson }}>>\n"
    "    {%- else %}\n[{{ m.role }}] {{ m.content }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}[assistant] {% endif %}"
)
SPECIALS = ("<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>")
CONVERSATIONS = [
    [ChatMessage("user", "What is the capital of France?")],
    [ChatMessage("system", "Answer in one word, <please> & \"quote\" é."),
     ChatMessage("user", "Capital of France?"), ChatMessage("assistant", "Paris."),
     ChatMessage("user", "  And of Italy?  ")],
]


def _chat_tokenizer(micro_checkpoint: Path, out: Path, template: str, *, bos: str) -> Path:
    """The micro tokenizer with chat special tokens and ``template``, as HF files in ``out``."""
    base = Tokenizer.from_dir(micro_checkpoint)
    base.backend.add_special_tokens(list(SPECIALS))
    config = {"chat_template": template, "add_bos_token": False}
    Tokenizer(base.backend, bos_token=bos, eos_token="<|im_end|>", config=config).save(out)
    return out


@pytest.mark.parametrize("template,bos", [(SMOLLM2, "<|im_start|>"),
                                          (LLAMA3, "<|begin_of_text|>"),
                                          (BLOCKS, "<|im_start|>")],
                         ids=["smollm2", "llama3", "blocks"])
def test_rendering_and_ids_match_transformers(micro_checkpoint: Path, tmp_path: Path,
                                              template: str, bos: str) -> None:
    transformers = pytest.importorskip("transformers")
    path = _chat_tokenizer(micro_checkpoint, tmp_path / "tok", template, bos=bos)
    ours, theirs = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    for conversation in CONVERSATIONS:
        as_dicts = [{"role": m.role, "content": m.content} for m in conversation]
        want = theirs.apply_chat_template(as_dicts, tokenize=False, add_generation_prompt=True)
        assert ours.prompt_text("", conversation) == want
        want_ids = theirs.apply_chat_template(as_dicts, tokenize=True,
                                              add_generation_prompt=True)
        if isinstance(want_ids, dict) or hasattr(want_ids, "input_ids"):
            want_ids = want_ids["input_ids"]
        # The template writes its special tokens; none is added on top (no second BOS).
        assert ours.encode_prompt("", conversation) == list(want_ids)


def test_a_raw_prompt_is_read_as_is(micro_checkpoint: Path, tmp_path: Path) -> None:
    path = _chat_tokenizer(micro_checkpoint, tmp_path / "tok", SMOLLM2, bos="<|im_start|>")
    tok = Tokenizer.from_dir(path)
    # add_bos_token false (as SmolLM2 says): a raw prompt gets no BOS.
    assert tok.encode_prompt("Hello there") == tok.encode("Hello there", add_bos=False)
    assert tok.prompt_text("Hello there") == "Hello there"


def test_a_template_refusal_is_the_users_error(micro_checkpoint: Path, tmp_path: Path) -> None:
    path = _chat_tokenizer(micro_checkpoint, tmp_path / "tok", LLAMA3, bos="<|begin_of_text|>")
    tok = Tokenizer.from_dir(path)
    twice = (ChatMessage("user", "a"), ChatMessage("user", "b"))
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        tok.encode_prompt("", twice)


def test_a_model_without_template_refuses_messages(micro_checkpoint: Path) -> None:
    tok = Tokenizer.from_dir(micro_checkpoint)
    assert tok.chat_template is None
    with pytest.raises(InvalidRequest, match=r"no chat template.*send a prompt"):
        tok.encode_prompt("", (ChatMessage("user", "hi"),))


@pytest.mark.parametrize("fields,message", [
    ({"prompt": "x", "messages": (ChatMessage("user", "y"),)}, "either prompt or messages"),
    ({"prompt": "", "messages": (ChatMessage("tool", "y"),)}, r"messages\[0\].role must be"),
    ({"prompt": "", "messages": (ChatMessage("user", "  "),)}, "some non-empty content"),
    ({"prompt": "", "messages": (ChatMessage("user", "a\x00"),)}, "NUL"),
    ({"prompt": "", "messages": (ChatMessage("user", "x" * 40),) * 2}, "bytes of content"),
    ({"prompt": "", "messages": (ChatMessage("user", "x"),) * 5}, "at most 4 messages"),
    ({"prompt": ""}, "prompt must be non-empty"),
])
def test_conversations_are_validated(fields: dict, message: str) -> None:
    limits = Limits(max_prompt_bytes=64, max_messages=4)
    with pytest.raises(InvalidRequest, match=message):
        validate(limits=limits, **fields)
    ok = validate(prompt="", messages=(ChatMessage("user", "hi"),), limits=limits)
    assert ok.prompt_bytes > len("hi")  # the template's overhead is estimated


async def test_the_cloud_tier_answers_a_conversation_as_rendered(micro_checkpoint: Path,
                                                                 tmp_path: Path) -> None:
    import shutil

    import grpc

    from cloud.engine import CloudEngineConfig
    from cloud.server import CloudServerConfig, start_cloud_server
    from core.grpc_server import ServerConfig
    from model.checkpoint import load_checkpoint
    from model.generate import generate_tokens
    from protos.tandem.v1 import inference_pb2 as pb
    from protos.tandem.v1 import inference_pb2_grpc

    # The micro model with a template of plain-text markers (its vocabulary stays as trained).
    model_dir = tmp_path / "chat-micro"
    shutil.copytree(micro_checkpoint, model_dir)
    tok = Tokenizer.from_dir(micro_checkpoint)
    Tokenizer(tok.backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
              config={"chat_template": BLOCKS}).save(model_dir)
    tok = Tokenizer.from_dir(model_dir)
    conversation = CONVERSATIONS[1]
    want = list(generate_tokens(load_checkpoint(model_dir), tok.encode_prompt("", conversation),
                                12, eos_id=tok.eos_id))

    server = await start_cloud_server(CloudServerConfig(
        engine=CloudEngineConfig(checkpoint=model_dir), server=ServerConfig(port=0)))
    channel = grpc.aio.insecure_channel(server.address)
    try:
        stub = inference_pb2_grpc.InferenceStub(channel)
        messages = [pb.ChatMessage(role=m.role, content=m.content) for m in conversation]
        resp = await stub.Generate(pb.GenerateRequest(messages=messages, max_tokens=12,
                                                      temperature=0.0), timeout=60)
        assert list(resp.token_ids) == want
        assert resp.usage.prompt_tokens == len(tok.encode_prompt("", conversation))
        scored = await stub.Score(pb.ScoreRequest(messages=messages), timeout=60)
        assert scored.prompt_tokens == resp.usage.prompt_tokens
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Generate(pb.GenerateRequest(prompt="x", messages=messages), timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "either prompt or messages" in (refused.value.details() or "")
    finally:
        await channel.close()
        await server.stop(1.0)
