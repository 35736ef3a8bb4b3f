"""vLLM's LoRA adapter routes: load an adapter folder under a name, unload it (admin routes: --admin_api_key,
else --api_key). The engine checks the adapter against the model; the API lists what is served."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from lightllm.engine.protocol import LORA_NAME_PATTERN
from lightllm.server.auth import ADMIN
from lightllm.server.engine_client import EngineDied
from lightllm.server.errors import APIError
from lightllm.server.state import ServerState, engine_unavailable

router = APIRouter()

AdapterName = Field(min_length=1, max_length=256, pattern=LORA_NAME_PATTERN,
                    description="the name requests select the adapter by (model: NAME): letters, digits and "
                                ". _ : @ + / -")


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = AdapterName
    lora_path: str = Field(min_length=1, description="a PEFT LoRA folder on the server: adapter_config.json + "
                                                     "adapter_model.safetensors")


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = AdapterName


class LoraAdapterResult(BaseModel):
    message: str
    lora_name: str


def _require_lora(state: ServerState) -> None:
    if not state.lora_enabled:
        raise APIError(400, "LoRA adapters are off: start the server with --enable_lora or --lora_modules",
                       code="lora_disabled")


async def _call(state: ServerState, name: str, path: str | None):
    try:
        return await state.engine.lora_call(name, path)
    except (EngineDied, asyncio.TimeoutError) as exc:
        raise engine_unavailable(f"engine unavailable: {exc or 'no reply'}") from exc


@router.post("/v1/load_lora_adapter", dependencies=[ADMIN], response_model=LoraAdapterResult)
async def load_lora_adapter(req: LoadLoraAdapterRequest, request: Request):
    """Serve the adapter at `lora_path` as `lora_name` (400 when it cannot: a name in use, no PEFT folder there,
    rank above --max_lora_rank, a target module the model lacks, shapes of another base model)."""
    state: ServerState = request.app.state.server
    _require_lora(state)
    if req.lora_name == state.model_name or req.lora_name in state.lora_adapters:
        raise APIError(400, f"the name {req.lora_name!r} is already served", param="lora_name",
                       code="lora_name_in_use")
    reply = await _call(state, req.lora_name, req.lora_path)
    if reply.error is not None:
        raise APIError(400, f"cannot load LoRA adapter {req.lora_name!r}: {reply.error}", param="lora_path",
                       code="invalid_lora_adapter")
    state.lora_adapters[req.lora_name] = req.lora_path
    return {"message": f"Success: LoRA adapter '{req.lora_name}' added successfully.", "lora_name": req.lora_name}


@router.post("/v1/unload_lora_adapter", dependencies=[ADMIN], response_model=LoraAdapterResult)
async def unload_lora_adapter(req: UnloadLoraAdapterRequest, request: Request):
    """Stop serving `lora_name` (404 when no such adapter is served); its requests in flight finish on it."""
    state: ServerState = request.app.state.server
    _require_lora(state)
    if req.lora_name not in state.lora_adapters:
        raise APIError(404, f"The model '{req.lora_name}' does not exist", param="lora_name",
                       code="model_not_found")
    del state.lora_adapters[req.lora_name]  # new requests for it get 404 from now on
    reply = await _call(state, req.lora_name, None)
    if reply.error is not None and not reply.not_found:
        raise APIError(500, reply.error)
    return {"message": f"Success: LoRA adapter '{req.lora_name}' removed successfully.", "lora_name": req.lora_name}
