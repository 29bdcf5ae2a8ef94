"""The thin gRPC servicer (TGI style): a protobuf request becomes a `GenerationRequest`, one call into the
`Frontend` per RPC, and its errors leave with the gRPC code `frontend.describe` gives them."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import json_format

from qwen_relay.v1 import relay_pb2, relay_pb2_grpc

from .frontend import FINISH_REASONS, Frontend, Piece, Prepared, describe
from .request import ChatTurn, GenerationRequest


@dataclass(frozen=True)
class ModelMeta:
    """What GetModelInfo reports besides the live per-slice numbers."""

    model_id: str
    num_layers: int
    max_batch: int


def from_grpc(request: relay_pb2.GenerateRequest | relay_pb2.TokenizeRequest) -> GenerationRequest:
    """The request record a gRPC request means (a TokenizeRequest carries only the input)."""
    options = {name: json_format.MessageToDict(value) for name, value in request.chat_template_kwargs.items()}
    messages = tuple(ChatTurn(m.role, m.content) for m in request.messages)
    if isinstance(request, relay_pb2.TokenizeRequest):
        return GenerationRequest(prompt=request.prompt, messages=messages, chat_template_kwargs=options)
    return GenerationRequest(
        prompt=request.prompt, messages=messages, prompt_token_ids=tuple(request.prompt_token_ids),
        request_id=request.request_id, max_new_tokens=request.max_new_tokens, temperature=request.temperature,
        top_p=request.top_p if request.HasField("top_p") else None, top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None, stop=tuple(request.stop),
        ignore_eos=request.ignore_eos, adapter=request.adapter, chat_template_kwargs=options,
        separate_reasoning=request.separate_reasoning)


async def abort(context: grpc.aio.ServicerContext, error: BaseException, what: str) -> None:
    """End the call with the code and message `describe` gives `error`."""
    status, message = describe(error, what)
    await context.abort(status.grpc, message)


def _response(prepared: Prepared, piece: Piece) -> relay_pb2.GenerateResponse:
    response = relay_pb2.GenerateResponse(request_id=prepared.seq.request_id, text=piece.text,
                                          token_ids=piece.token_ids, reasoning=piece.reasoning)
    if piece.finish_reason is not None:
        response.finish_reason = FINISH_REASONS[piece.finish_reason].grpc
        usage = prepared.usage
        response.usage.prompt_tokens, response.usage.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        response.usage.cached_prompt_tokens = usage.cached_prompt_tokens
    return response


class TextGenerationServicer(relay_pb2_grpc.TextGenerationServicer):
    def __init__(self, frontend: Frontend, meta: ModelMeta) -> None:
        self.frontend = frontend
        self.meta = meta

    async def Generate(self, request, context):  # noqa: N802 - gRPC method names
        try:
            prepared = await self.frontend.prepare(from_grpc(request))
            return _response(prepared, await self.frontend.fold(None, self.frontend.pieces(prepared), prepared))
        except Exception as e:  # noqa: BLE001 - every error ends this call with its status, never the server
            await abort(context, e, "generation")

    async def GenerateStream(self, request, context):  # noqa: N802
        try:
            prepared = await self.frontend.prepare(from_grpc(request))
            async for piece in self.frontend.pieces(prepared):
                yield _response(prepared, piece)
        except Exception as e:  # noqa: BLE001
            await abort(context, e, "generation")

    async def Tokenize(self, request, context):  # noqa: N802
        try:
            ids = await self.frontend.tokenize(from_grpc(request))
        except Exception as e:  # noqa: BLE001
            await abort(context, e, "tokenizing")
        return relay_pb2.TokenizeResponse(token_ids=ids, count=len(ids))

    async def GetModelInfo(self, request, context):  # noqa: N802
        try:
            stats = await self.frontend.check_ready().pipeline.stats()
        except Exception as e:  # noqa: BLE001
            await abort(context, e, "model info")
        limits = self.frontend.limits
        info = relay_pb2.ModelInfo(
            model_id=self.meta.model_id,
            dtype=next((s.dtype for s in stats if s.dtype), ""),  # a slice that is down reports none
            num_layers=self.meta.num_layers,
            max_context=limits.max_context,
            vocab_size=limits.vocab_size,
            max_new_tokens_cap=limits.max_new_tokens_cap,
            max_batch_size=self.meta.max_batch,
        )
        engine = self.frontend.engine
        kv = engine.kv_stats()
        info.kv_capacity_tokens, info.kv_block_size, info.kv_blocks_free = (kv.capacity_tokens, kv.block_size,
                                                                            kv.blocks_free)
        info.prefix_cache, info.prefix_cache_hit_rate, info.preemptions = kv.prefix_cache, kv.hit_rate, kv.preemptions
        holding = engine.sequences_holding_blocks()
        for i, s in enumerate(stats):
            info.slices.add(
                index=i, first_layer=s.first, last_layer=s.end - 1, has_embeddings=s.has_embeddings,
                has_lm_head=s.has_lm_head, actor_id=s.actor_id, node_id=s.node_id, device=s.device,
                cache_entries=holding, weight_bytes=s.weight_bytes,
                peak_rss_bytes=s.peak_rss_bytes, healthy=s.healthy, restarts=s.restarts,
            )
        return info
