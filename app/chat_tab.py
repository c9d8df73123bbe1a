"""Chat tab: talk to a finished run (or a base model alone) with streaming replies, and see under each
reply which expert every token went to: tokens coloured by their top expert at a chosen layer, and for a
selected token its layers × experts routing weights. The routing is what ``qmoe.trace_routing`` recorded
during the generation's own forward passes (prompt pass + one pass per generated token), not recomputed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gradio as gr
import numpy as np
import torch

import qmoe

from .context import UIContext
from .paths import UnsafePathError, resolve_model_source
from .plots import empty_figure, expert_color, short_layer_name, token_heatmap
from .runs import recipe_device

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from qmoe.chat import ChatModel

BASE_PREFIX = "base:"
RUN_PREFIX = "run:"


@dataclass
class LoadedModel:
    key: str  # the dropdown value it was loaded for
    chat: ChatModel
    method: str | None  # None: base model without adapter


@dataclass
class Routing:
    """Routing of one reply: token texts and, per routed layer, weights [tokens, experts] (NaN rows for
    tokens that were never fed through the model, i.e. the last generated one)."""

    tokens: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    method: str | None = None


class ChatModels:
    """Keeps one loaded model (the last one chosen) and serialises generation on it."""

    def __init__(self, ctx: UIContext):
        self.ctx = ctx
        self.current: LoadedModel | None = None
        self.lock = threading.Lock()

    def choices(self) -> list[tuple[str, str]]:
        items = []
        for name in self.ctx.runs.list_runs():
            try:
                if self.ctx.runs.adapter_dir(name) is not None:
                    items.append((f"run {name}", RUN_PREFIX + name))
            except (OSError, UnsafePathError):
                continue
        items += [(f"base model only: {source}", BASE_PREFIX + source) for source in self.ctx.model_choices()]
        return items

    def load(self, key: str) -> LoadedModel:
        """The model for a dropdown value, loaded through ``qmoe.chat`` (replacing the previous one) when
        needed. Called with ``self.lock`` held."""
        if self.current is not None and self.current.key == key:
            return self.current
        from qmoe.chat import load_chat_model

        self.current = None  # free the previous model before loading the next
        if key.startswith(RUN_PREFIX):
            name = key[len(RUN_PREFIX) :]
            if self.ctx.runs.adapter_dir(name) is None:
                raise UnsafePathError(f"run {name} has no saved adapter yet (it is not finished)")
            chat = load_chat_model(self.ctx.runs.run_dir(name))
            method = qmoe.adapter_config(chat.model).method
        elif key.startswith(BASE_PREFIX):
            chat = load_chat_model(None, base_source=resolve_model_source(key[len(BASE_PREFIX) :], self.ctx.models_dir))
            method = None
        else:
            raise UnsafePathError(f"unknown chat model {key!r}")
        self.current = LoadedModel(key, chat, method)
        return self.current

    def training_warning(self, key: str) -> str | None:
        """A warning when loading ``key`` (not loaded yet) would share its device with a training run:
        the two compete for that device's memory (on a GPU the training, or this, may die of OOM)."""
        if self.current is not None and self.current.key == key:
            return None  # already in memory: nothing new is loaded
        device = recipe_device("")  # the chat model loads with device auto, as a recipe's default
        busy = self.ctx.runs.busy_runs(device)
        if not busy:
            return None
        free = ""
        if device.startswith("cuda") and torch.cuda.is_available():
            # what the GPU has left now (the training's use included): the figure that decides an OOM
            available, total = torch.cuda.mem_get_info(torch.device(device))
            free = f"; {available / 2**30:.1f} of {total / 2**30:.1f} GiB of GPU memory free now"
        return (
            f"**Warning:** run {', '.join(busy)} is training on {device}; this model loads on the same device, "
            f"so the two compete for its memory (the training or this chat may run out of memory){free}"
        )


def prompt_token_ids(chat: ChatModel, messages: list[dict]) -> list[int]:
    """The prompt exactly as ``qmoe.chat.stream_reply`` tokenizes it (chat template, no extra specials)."""
    text = chat.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return chat.tokenizer(text, add_special_tokens=False)["input_ids"]


def collect_routing(loaded: LoadedModel, prompt_ids: list[int], generated: list[str]) -> Routing:
    """Per-token routing from the traces the generation left in the model (``qmoe.routing``). With the KV
    cache the first traced forward covers the prompt and each later one the previously generated token, so
    row i is the routing of token i itself as it went through the layer; the last generated token was
    never fed back and has no row."""
    tokenizer = loaded.chat.tokenizer
    texts = [tokenizer.decode([t], skip_special_tokens=False) for t in prompt_ids] + list(generated)
    routing = Routing(tokens=texts, method=loaded.method)
    if loaded.method is None:
        return routing
    for layer, info in qmoe.routing(loaded.chat.model).items():
        traces = info["trace"]
        if not traces:
            continue
        rows = torch.cat([t.reshape(-1, t.shape[-1]) for t in traces]).float().numpy()
        full = np.full((len(texts), rows.shape[1]), np.nan, dtype=np.float32)
        n = min(len(texts), rows.shape[0])
        full[:n] = rows[:n]
        routing.layers.append(layer)
        routing.weights[layer] = full
    return routing


def expert_word(method: str | None) -> str:
    return "rank" if method == "loracoe" else "expert"


def highlighted_tokens(routing: Routing, layer: str | None) -> tuple[list[tuple[str, str | None]], dict]:
    """(token, label) pairs for gr.HighlightedText and the label -> colour map (the legend)."""
    if not routing.tokens:
        return [], {}
    word = expert_word(routing.method)
    if layer not in routing.weights:
        return [(t, None) for t in routing.tokens], {}
    weights = routing.weights[layer]
    pairs = []
    for text, row in zip(routing.tokens, weights, strict=False):
        pairs.append((text, None if np.isnan(row).all() else f"{word} {int(np.nanargmax(row))}"))
    colors = {f"{word} {e}": expert_color(e) for e in range(weights.shape[1])}
    return pairs, colors


def build_chat_tab(ctx: UIContext) -> dict:
    models = ChatModels(ctx)
    choices = models.choices()
    gr.Markdown(
        "Chat with a finished run's adapter (or the base model alone). Under each reply: the prompt and the "
        "reply's tokens coloured by their top expert at the chosen layer, as each token was routed when it "
        "went through the model during this generation (the reply's last token is never fed back, so it has "
        "no colour). Click a token to see its routing weights in every layer. For LoRACoE the columns are "
        "the LoRA ranks (rank-composition weights)."
    )
    with gr.Row():
        model_choice = gr.Dropdown(
            choices=choices, value=choices[0][1] if choices else None, label="Model", elem_id="chat-model", scale=3
        )
        max_new_tokens = gr.Slider(1, 512, value=64, step=1, label="Max new tokens", scale=1)
        temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)", scale=1)
    chatbot = gr.Chatbot(label="Conversation", elem_id="chat-history", height=320)
    with gr.Row():
        message = gr.Textbox(placeholder="Ask something…", show_label=False, scale=5, elem_id="chat-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        clear = gr.Button("Clear", scale=1)
    status = gr.Markdown(elem_id="chat-status")
    gr.Markdown("### Routing of the last reply")
    layer = gr.Dropdown(choices=[], label="Layer", elem_id="chat-layer")
    tokens_view = gr.HighlightedText(
        label="Tokens coloured by top expert (prompt, then reply)",
        show_legend=True,
        show_inline_category=False,
        combine_adjacent=False,
        elem_id="chat-routing",
        interactive=False,
    )
    with gr.Row():
        token_index = gr.Number(
            value=None,
            precision=0,
            label="Selected token # (or click a token above)",
            elem_id="chat-token-index",
            scale=1,
        )
        token_plot = gr.Plot(
            label="Routing weights of the selected token (layers × experts)",
            show_label=False,
            format="png",
            elem_id="chat-token-heatmap",
            scale=4,
        )
    routing_state = gr.State(Routing())

    def respond(key: str | None, text: str | None, history: list | None, max_tokens: float, temp: float):
        history = list(history or [])
        text = (text or "").strip()
        if not text:
            yield {chatbot: history, status: "type a message first"}
            return
        if not key:
            yield {chatbot: history, status: "**Error:** choose a model first"}
            return
        history.append({"role": "user", "content": text})
        warning = None
        try:
            with models.lock:
                warning = models.training_warning(key)
                yield {chatbot: history, message: "", status: _warned(warning, "loading the model and generating…")}
                loaded = models.load(key)
                for update in _generate(loaded, history, int(max_tokens), float(temp)):
                    yield {**update, status: _warned(warning, update[status])}
        except Exception as exc:  # noqa: BLE001 - shown to the user; the UI must keep serving
            message_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            yield {chatbot: history, status: _warned(warning, f"**Error:** {message_line}")}

    def _generate(loaded: LoadedModel, history: list[dict], max_tokens: int, temp: float):
        from qmoe.chat import stream_reply

        messages = [{"role": m["role"], "content": _content_text(m["content"])} for m in history]
        prompt_ids = prompt_token_ids(loaded.chat, messages)
        history = history + [{"role": "assistant", "content": ""}]
        reply, done = "", None
        for event in stream_reply(
            loaded.chat, messages, max_new_tokens=max_tokens, temperature=temp, trace=loaded.method is not None
        ):
            if event.get("done"):
                done = event
                break
            reply += event["text"]
            history[-1] = {"role": "assistant", "content": reply}
            yield {chatbot: history, status: "generating…"}
        history[-1] = {"role": "assistant", "content": done["text"]}
        routing = collect_routing(loaded, prompt_ids, done["tokens"])
        prompt_len, generated = len(prompt_ids), len(done["tokens"])
        if not routing.layers:
            note = "no router: base model" if loaded.method is None else f"no router: {loaded.method} has no experts"
            yield {
                chatbot: history,
                status: f"{generated} tokens generated · {note}",
                routing_state: routing,
                layer: gr.update(choices=[], value=None),
                tokens_view: [],
                token_plot: None,
                token_index: None,
            }
            return
        first = routing.layers[0]
        pairs, colors = highlighted_tokens(routing, first)
        selected = prompt_len  # the first generated token
        yield {
            chatbot: history,
            status: f"{generated} tokens generated · routing recorded in {len(routing.layers)} layers",
            routing_state: routing,
            layer: gr.update(choices=[(short_layer_name(n), n) for n in routing.layers], value=first),
            tokens_view: gr.update(value=pairs, color_map=colors),
            token_plot: _token_figure(routing, selected),
            token_index: selected,
        }

    def change_layer(routing: Routing, name: str | None):
        pairs, colors = highlighted_tokens(routing, name)
        return gr.update(value=pairs, color_map=colors)

    def select_token(routing: Routing, event: gr.SelectData):
        index = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        return _token_figure(routing, int(index)), int(index)

    def show_token(routing: Routing, index: float | None):
        if index is None:
            return gr.skip()
        return _token_figure(routing, int(index))

    outputs = [chatbot, message, status, routing_state, layer, tokens_view, token_plot, token_index]
    inputs = [model_choice, message, chatbot, max_new_tokens, temperature]
    # one generation at a time (one loaded model): further chats wait in Gradio's queue, which shows each
    # browser its position, instead of holding a worker thread each while they wait for the model's lock
    send.click(respond, inputs, outputs, api_name="chat", concurrency_limit=1, concurrency_id="chat-model")
    message.submit(respond, inputs, outputs, api_visibility="private", concurrency_limit=1, concurrency_id="chat-model")
    clear.click(
        lambda: ([], Routing(), gr.update(choices=[], value=None), [], None, None, ""),
        None,
        [chatbot, routing_state, layer, tokens_view, token_plot, token_index, status],
        api_visibility="private",
    )
    layer.input(change_layer, [routing_state, layer], tokens_view, api_visibility="private")
    tokens_view.select(select_token, routing_state, [token_plot, token_index], api_visibility="private")
    token_index.submit(show_token, [routing_state, token_index], token_plot, api_name="token_routing")

    def refresh_choices(current: str | None):
        items = models.choices()
        values = [v for _, v in items]
        return gr.update(choices=items, value=current if current in values else (values[0] if values else None))

    return {"model": model_choice, "refresh_choices": refresh_choices}


def _warned(warning: str | None, text: str) -> str:
    return f"{warning}\n\n{text}" if warning else text


def _content_text(content: object) -> str:
    """Chatbot messages may carry structured content (Gradio 6: a list of parts); keep the text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)


def _token_figure(routing: Routing, index: int) -> Figure | None:
    if not routing.layers or not 0 <= index < len(routing.tokens):
        return None
    matrix = np.stack([routing.weights[n][index] for n in routing.layers])
    if np.isnan(matrix).all():
        return empty_figure(
            f"token #{index} {routing.tokens[index]!r} ended the reply: it was never fed through the model"
        )
    return token_heatmap(matrix, routing.layers, routing.tokens[index], index)
