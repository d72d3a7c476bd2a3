"""Chat counts against the references, per family, at test time:

- Mistral: mistral-common 1.13.1's own `encode_chat_completion` (built here from its request
  classes, not through the service's module), on chats with several system prompts, trailing
  spaces, tool definitions, tool calls and results;
- Llama 3.1+, Qwen 2.5, Qwen 3: the official chat template rendered by a jinja2 environment set
  up here the way transformers' `apply_chat_template` sets it up, the whole text encoded at once
  with the verified rank file (special tokens as Hugging Face tokenizers read them);
- OpenAI tool definitions: every prompt-token figure the OpenAI cookbook reports from the API
  for its function-calling example.

The service counts a chat in pieces cut before special tokens, each piece cached; these tests
prove the pieces add up to the reference for every case, and that each family's own features
(the date block, the default system prompt, thinking dropped from history) are in the count.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from services.context import tokenizer_data
from services.context.messages import ChatMessage, RenderOptions, Role, ServingStack, ToolDef
from services.context.messages import ToolCall as Call
from services.context.tokenizers import LLAMA3, QWEN2, TokenCounter, TokenizerPool, resolve_model
from services.context.tokenizers.data import data_dir as _data_dir
from services.context.tokenizers.templates import TEMPLATE_DIR

S, U, A, T = Role.SYSTEM, Role.USER, Role.ASSISTANT, Role.TOOL


@pytest.fixture(scope="module")
def data_dir() -> Path:
    directory = _data_dir()
    assert tokenizer_data.verify(directory) == [], "run `make tokenizers`"
    return directory


@pytest.fixture(scope="module")
def counter(data_dir: Path) -> TokenCounter:
    return TokenCounter(TokenizerPool(data_dir=data_dir))


def call(call_id: str, name: str, **arguments: Any) -> Call:
    return Call(call_id, name, json.dumps(arguments), arguments)


def m(role: Role, content: str = "", *calls: Call, answers: str = "") -> ChatMessage:
    return ChatMessage(
        role, content, tool_call_id=answers, tool_call_ids=tuple(c.id for c in calls),
        tool_calls=calls,
    )  # fmt: skip


WEATHER = ToolDef(
    "get_weather",
    "Get the current weather in a given location.",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "The city, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
)
SEARCH = ToolDef(
    "search", "Search the web.", {"type": "object", "properties": {"q": {"type": "string"}}}
)

# Ten chats of the kinds agents send (the ids are 9 letters or digits, as Mistral requires).
CHATS: list[tuple[str, list[ChatMessage], list[ToolDef]]] = [
    ("plain", [m(S, "You are terse."), m(U, "Hi."), m(A, "Hello."), m(U, "What is 2+2?")], []),
    ("no system", [m(U, "Hi there"), m(A, "Hello! How can I help?"), m(U, "Tell me a joke.")], []),
    ("two system prompts",
     [m(S, "Be brief."), m(S, "Answer in French."), m(U, "Capital of Italy?")], []),
    ("trailing spaces and blank lines",
     [m(S, "Rules follow. "), m(U, "\n\nFirst line  "), m(A, "Sure.  "), m(U, "  and then?  ")],
     []),
    ("one call and its result",
     [m(S, "Use tools."), m(U, "Weather in Paris?"),
      m(A, "", call("abcDEF123", "get_weather", city="Paris")),
      m(T, '{"temp": 21, "sky": "clear"}', answers="abcDEF123"), m(A, "21 °C and clear."),
      m(U, "And tomorrow?")], [WEATHER]),
    ("a call awaiting the model",
     [m(U, "Search for tokenizers."), m(A, "", call("q1W2e3R4t", "search", q="tokenizers")),
      m(T, "1. tiktoken 2. sentencepiece", answers="q1W2e3R4t")], [SEARCH, WEATHER]),
    ("two calls at once (not for Llama 3.1)",
     [m(U, "Weather in Paris and Rome?"),
      m(A, "", call("aaaaaaaa1", "get_weather", city="Paris"),
        call("aaaaaaaa2", "get_weather", city="Rome", unit="celsius")),
      m(T, '{"temp": 21}', answers="aaaaaaaa1"), m(T, '{"temp": 25}', answers="aaaaaaaa2"),
      m(U, "Which is warmer?")], [WEATHER]),
    ("unicode and code",
     [m(S, "Tu es un assistant. Réponds brièvement."), m(U, "Écris `print('héllo')` en Go."),
      m(A, 'fmt.Println("héllo")'), m(U, "Merci ! 🙏")], []),
    ("tools without calls", [m(S, "You may search."), m(U, "Who wrote Dune?")], [SEARCH]),
    ("long history",
     [m(S, "You are a travel agent.")]
     + [m(U if i % 2 == 0 else A, f"Turn {i}: " + "plans for the trip " * (i % 5 + 1))
        for i in range(12)]
     + [m(U, "Summarize the plan.")], []),
]  # fmt: skip


def ids(cases: Sequence[tuple[str, Any, Any]]) -> list[str]:
    return [c[0] for c in cases]


# --- Mistral: mistral-common itself ----------------------------------------------------------


def mistral_reference(path: Path, chat: list[ChatMessage], tools: list[ToolDef]) -> int:
    def convert(x: ChatMessage) -> Any:
        if x.role is S:
            return SystemMessage(content=x.content)
        if x.role is U:
            return UserMessage(content=x.content)
        if x.role is T:
            return ToolMessage(content=x.content, tool_call_id=x.tool_call_id)
        calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments_json))
                 for c in x.tool_calls]  # fmt: skip
        return AssistantMessage(content=x.content or None, tool_calls=calls or None)

    request = ChatCompletionRequest(
        messages=[convert(x) for x in chat],
        tools=[
            Tool(function=Function(name=t.name, description=t.description, parameters=t.parameters))
            for t in tools
        ]
        or None,
    )
    return len(mistral_tokenizer(str(path)).encode_chat_completion(request).tokens)


@functools.cache
def mistral_tokenizer(path: str) -> MistralTokenizer[Any, Any, Any, Any, Any]:
    return MistralTokenizer.from_file(path)


@pytest.mark.parametrize(("chat", "tools"), [c[1:] for c in CHATS], ids=ids(CHATS))
def test_mistral_counts_equal_mistral_commons_encode_chat_completion(
    counter: TokenCounter, data_dir: Path, chat: list[ChatMessage], tools: list[ToolDef]
) -> None:
    counted = counter.count_chat(resolve_model("mistral-nemo"), chat, tools)
    assert counted.total == mistral_reference(data_dir / "tekken_240718.json", chat, tools)
    assert counted.total == sum(counted.per_message) + counted.reply_priming + counted.tool_tokens
    assert counted.exact and counted.method == "encode_chat_completion:mistral-common==1.13.1"
    assert (counted.tool_tokens > 0) == bool(tools)


# --- Llama 3.1+ and Qwen: the official template, rendered as transformers renders it ---------


def hf_render(
    template_file: str, chat: list[ChatMessage], tools: list[ToolDef], **extra: Any
) -> str:
    """transformers' apply_chat_template(tokenize=False, add_generation_prompt=True): its
    sandboxed environment, options and globals, and messages and tools as OpenAI-style dicts
    with the arguments parsed (as vLLM passes them)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)  # fmt: skip

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: dt.datetime.now(dt.UTC).strftime(fmt)
    messages: list[dict[str, Any]] = []
    for x in chat:
        d: dict[str, Any] = {"role": x.role.value, "content": x.content}
        if x.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments}}
                               for c in x.tool_calls]  # fmt: skip
        if x.role is T:
            d["tool_call_id"] = x.tool_call_id
        messages.append(d)
    schemas = [
        {"type": "function",
         "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        for t in tools
    ]  # fmt: skip
    template = env.from_string((TEMPLATE_DIR / template_file).read_text())
    return template.render(
        messages=messages, tools=schemas or None, add_generation_prompt=True, **extra
    )


def encode_all(counter_pool: TokenizerPool, encoding: str, text: str) -> int:
    return counter_pool.get(encoding).count_with_specials(text)


TEMPLATE_MODELS = [
    ("llama-3.1-8b-instruct", "llama3.1.jinja", LLAMA3, {"bos_token": "<|begin_of_text|>"}),
    ("llama-3.3-70b-instruct", "llama3.1.jinja", LLAMA3,
     {"bos_token": "<|begin_of_text|>",
      "date_string": dt.datetime.now(dt.UTC).strftime("%d %b %Y")}),
    ("qwen2.5-7b-instruct", "qwen2.5.jinja", QWEN2, {}),
    ("qwen3-8b", "qwen3.jinja", QWEN2, {}),
]  # fmt: skip


@pytest.mark.parametrize(("model", "template", "encoding", "extra"), TEMPLATE_MODELS,
                         ids=[t[0] for t in TEMPLATE_MODELS])  # fmt: skip
@pytest.mark.parametrize(("chat", "tools"), [c[1:] for c in CHATS], ids=ids(CHATS))
def test_template_counts_equal_the_official_template_rendered_and_encoded_whole(
    data_dir: Path, model: str, template: str, encoding: str, extra: dict[str, Any],
    chat: list[ChatMessage], tools: list[ToolDef],
) -> None:  # fmt: skip
    pool = TokenizerPool(data_dir=data_dir)
    counter = TokenCounter(pool)
    spec = resolve_model(model)
    if template == "llama3.1.jinja" and any(len(x.tool_calls) > 1 for x in chat):
        with pytest.raises(ValueError, match="single tool-calls"):
            counter.count_chat(spec, chat, tools, RenderOptions(model=spec.name))
        return
    counted = counter.count_chat(spec, chat, tools, RenderOptions(model=spec.name))
    reference = encode_all(pool, encoding, hf_render(template, chat, tools, **extra))
    assert counted.total == reference
    assert counted.total == sum(counted.per_message) + counted.reply_priming + counted.tool_tokens
    assert counted.exact and counted.method.startswith("template:")
    again = counter.count_chat(spec, chat, tools, RenderOptions(model=spec.name))
    assert again == counted  # from the piece cache


def test_llama31_states_the_knowledge_and_today_dates(counter: TokenCounter) -> None:
    """The block the official template adds (-20 to -25 tokens when it was missing), with the
    request's date when one is given."""
    chat = CHATS[0][1]
    llama30 = counter.count_chat(resolve_model("llama-3-8b"), chat).total
    spec = resolve_model("llama-3.1-8b")
    llama31 = counter.count_chat(spec, chat, (), RenderOptions(model=spec.name))
    assert 20 <= llama31.total - llama30 <= 25
    dated = RenderOptions(model=spec.name, date="2026-12-06")
    text = hf_render("llama3.1.jinja", chat, [], bos_token="<|begin_of_text|>",
                     date_string="06 Dec 2026")  # fmt: skip
    assert "Today Date: 06 Dec 2026" in text
    pool = TokenizerPool(data_dir=_data_dir())
    assert counter.count_chat(spec, chat, (), dated).total == encode_all(pool, LLAMA3, text)


def test_ollama_renders_llama31_without_the_date_block_and_says_it_is_estimated(
    counter: TokenCounter,
) -> None:
    chat = CHATS[0][1]
    spec = resolve_model("llama3.1:8b")
    ollama = counter.count_chat(spec, chat, (), RenderOptions(ServingStack.OLLAMA, "", spec.name))
    hf = counter.count_chat(spec, chat, (), RenderOptions(model=spec.name))
    assert ollama.total < hf.total and not ollama.exact
    assert ollama.method == "exact:llama3+ollama:llama3.1-message-format"


def test_qwen25_injects_its_default_system_prompt_and_qwen3_does_not(counter: TokenCounter) -> None:
    chat = [m(U, "Hi there")]
    q25 = counter.count_chat(resolve_model("qwen2.5-7b"), chat)
    q3 = counter.count_chat(resolve_model("qwen3-8b"), chat)
    default = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n"
    )
    pool = TokenizerPool(data_dir=_data_dir())
    assert q25.total - q3.total == encode_all(pool, QWEN2, default) == 21


def test_qwen3_drops_the_reasoning_of_earlier_turns(counter: TokenCounter) -> None:
    thought = m(A, "<think>\nLet me add 2 and 2 carefully, step by step.\n</think>\n\n4.")
    plain = m(A, "4.")
    spec = resolve_model("qwen3-8b")
    before = [m(U, "2+2?"), thought, m(U, "And 3+3?")]
    assert (
        counter.count_chat(spec, before).total
        == counter.count_chat(spec, [before[0], plain, before[2]]).total
    )
    after = [m(U, "2+2?"), thought]  # after the last query, the reasoning is kept
    assert counter.count_chat(spec, after).total > counter.count_chat(spec, [after[0], plain]).total


# --- OpenAI: the cookbook's published figures ------------------------------------------------

# "How to count tokens with tiktoken", section "Counting tokens for chat completions with tool
# calls": its example and the prompt tokens it reports from the API for each model.
COOKBOOK_TOOL = ToolDef(
    "get_current_weather",
    "Get the current weather in a given location",
    {
        "type": "object",
        "properties": {
            "location": {"type": "string",
                         "description": "The city and state, e.g. San Francisco, CA"},
            "unit": {"type": "string", "description": "The unit of temperature to return",
                     "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location"],
    },
)  # fmt: skip
COOKBOOK_CHAT = [
    m(S, "You are a helpful assistant that can answer to questions about the weather."),
    m(U, "What's the weather like in San Francisco?"),
]
COOKBOOK_API_PROMPT_TOKENS = {"gpt-3.5-turbo": 105, "gpt-4": 105, "gpt-4o": 101, "gpt-4o-mini": 101}


@pytest.mark.parametrize(("model", "published"), COOKBOOK_API_PROMPT_TOKENS.items())
def test_openai_tool_definitions_match_every_figure_the_cookbook_publishes(
    counter: TokenCounter, model: str, published: int
) -> None:
    counted = counter.count_chat(resolve_model(model), COOKBOOK_CHAT, [COOKBOOK_TOOL])
    assert counted.total == published
    assert counted.tool_method.startswith("calibrated:openai-cookbook(")
    assert not counted.exact  # one published schema cannot prove every schema


def test_calls_named_by_id_alone_are_counted_as_absent_and_marked_estimated(
    counter: TokenCounter,
) -> None:
    """tool_call_ids without names and arguments (older callers): the model would see the
    call, the count cannot, so it says so."""
    spec = resolve_model("qwen2.5-7b")
    chat = [m(U, "Weather?"), ChatMessage(A, "", tool_call_ids=("c1",)), m(T, "21", answers="c1")]
    counted = counter.count_chat(spec, chat)
    assert not counted.exact
    assert counted.method == "template:qwen2.5-hf-template+tool-call-ids-without-calls"
    whole = [chat[0], m(A, "", call("c1", "get_weather", city="Paris")), chat[2]]
    assert counter.count_chat(spec, whole).exact
