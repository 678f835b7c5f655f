"""Wrapping grpc.aio method handlers: one place that knows the four handler kinds, and the kit's chain.

Server interceptors in grpc.aio see no ServicerContext, so checks that need the peer (authorisation) or
the outcome (error mapping) wrap the handler that `continuation` returns. `wrap_handler` does that for
unary and streaming handlers alike, with a `before` hook (may abort) and an `on_error` hook (maps or
re-raises an exception).

The kit's chain (`ChainInterceptor`), per call, outermost first::

    wrapping layers (telemetry → authorisation → error mapping)   see the raw request bytes
    → decode (parse + undefined enum values refused)               INVALID_ARGUMENT on a bad body
    → request layers (`Layer`, e.g. the guard's HMAC check)        see the decoded request AND its raw bytes
    → the service's handler                                        sees the decoded request

Each method's handler is rebuilt ONCE with ``request_deserializer=None``, so grpc hands the request over as
the bytes received and nothing is parsed before authorisation: a caller that may not call the method gets
PERMISSION_DENIED whatever it sent, an allowed caller with a body that is not the method's message gets
INVALID_ARGUMENT (`ErrorInfo` reason ``MALFORMED_REQUEST`` + `BadRequest`), and either way the call is logged
and counted like any other.

A request layer (what a service adds: ``MeshServer(config, policy, services, layers=[...])``)::

    class SignatureCheck(Layer):
        def for_method(self, method: str) -> Before | None:     # once per method; None: skip the method
            return None if method in UNSIGNED else self.before

        async def before(self, context: Context, request: Any, raw: bytes) -> None:
            ...  # raise a DomainError (mapped to its status) or abort the call; return to let it through

A layer may also act AFTER the handler, with the call's outcome (`Layer.after_for_method`, asked once per method;
None — the default — adds nothing per call: a method none of whose layers has an after-hook is built exactly as
before)::

    async def after(context: Context, error: BaseException | None, done: bool) -> None: ...

For a unary response it is awaited once the handler returned (``error`` None) or raised (``error`` the exception),
``done`` True, BEFORE the response is released: it may raise to replace the outcome (a response held back, an
error replaced), or return to let it stand. For a streaming response it is awaited before the first response
message is released (``done`` False, ``error`` None: hold the stream until something running beside the handler
completed) and once more when the stream ended, with its outcome (``done`` True). It is awaited too when a request
check of the call refused it (``error`` that refusal) or the stream ended before its first message, so a layer
whose check started something for the call always sees it end. The hooks of several layers run in their order.

`before` runs after decoding, once per request message: once per call for unary requests, for each message
as the handler reads it for streaming requests. `raw` is exactly the bytes received for that message (sign
and verify these, never a re-serialisation of `request`). Handlers behind the chain read streamed requests
from the request iterator; `context.read()` would return raw bytes.

Undefined enum values: per message type, the paths to its enum fields (nested messages, repeated fields,
map values) are found once from the descriptor and cached; a value the enum does not define is refused
with ``UNDEFINED_ENUM_VALUE`` naming the field (``tone``, ``parts[2].tone``, ``tones["k"]``). A message
type without enum fields anywhere below it costs no check at all.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, TypeAlias, cast

import grpc
from google.protobuf.message import Message

from tradeguard.errors import FieldViolation, InvalidArgument
from tradeguard.rpc.metadata import hand_over

# protobuf's descriptors (pure Python or upb) are typed loosely here: only their common reflection API is used.
Descriptor: TypeAlias = Any
FieldDescriptor: TypeAlias = Any

Context = grpc.aio.ServicerContext[Any, Any]
Before = Callable[[Context], Awaitable[None]]
OnError = Callable[[BaseException, Context], Awaitable[None]]
#: A request layer's per-call hook: (context, decoded request, raw request bytes as received).
RequestCheck = Callable[[Context, Any, bytes], Awaitable[None]]
#: A request layer's hook after the handler: (context, the handler's exception or None, done) — see the module.
After = Callable[[Context, BaseException | None, bool], Awaitable[None]]


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    *,
    before: Before | None = None,
    on_error: OnError | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind that runs `before`, then the behaviour; exceptions go to `on_error`
    (which must raise: it aborts the call or re-raises). Only async behaviours are supported."""

    async def failed(exc: BaseException, context: Context) -> None:
        if on_error is not None:
            await on_error(exc, context)
        raise exc

    # Per call, each layer is one coroutine frame: no awaiting of a hook that is not there.
    def unary(behavior: Callable[[Any, Context], Awaitable[Any]]) -> Callable[[Any, Context], Awaitable[Any]]:
        if before is None:

            async def run(request: Any, context: Context) -> Any:
                try:
                    return await behavior(request, context)
                except Exception as exc:
                    await failed(exc, context)

            return run

        check = before

        async def checked(request: Any, context: Context) -> Any:
            await check(context)
            try:
                return await behavior(request, context)
            except Exception as exc:
                await failed(exc, context)

        return checked

    def streaming(
        behavior: Callable[[Any, Context], AsyncIterator[Any]],
    ) -> Callable[[Any, Context], Any]:
        if inspect.iscoroutinefunction(behavior):  # a streaming response written with context.write()
            return unary(cast(Callable[[Any, Context], Awaitable[Any]], behavior))

        async def run(request: Any, context: Context) -> AsyncIterator[Any]:
            if before is not None:
                await before(context)
            try:
                async for item in behavior(request, context):
                    yield item
            except Exception as exc:
                await failed(exc, context)

        return run

    return rebuild(handler, unary_response=unary, stream_response=streaming)


Behaviour = Callable[..., Any]
_SAME: Final = object()


def rebuild(
    handler: grpc.RpcMethodHandler[Any, Any],
    *,
    unary_response: Callable[[Behaviour], Behaviour],
    stream_response: Callable[[Behaviour], Behaviour],
    request_deserializer: Any = _SAME,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind and serializers whose behaviour is `unary_response(behaviour)` (unary-unary,
    stream-unary) or `stream_response(behaviour)` (unary-stream, stream-stream); `request_deserializer`
    replaces the handler's own when given (None: the behaviour receives the request bytes)."""
    kwargs = {
        "request_deserializer": handler.request_deserializer
        if request_deserializer is _SAME
        else request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    # grpc's stubs type behaviours as sync callables; on a grpc.aio server they are coroutines/async generators
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_response(cast(Any, handler.unary_unary)), **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary_response(cast(Any, handler.stream_unary)), **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream_response(cast(Any, handler.unary_stream)), **kwargs
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            stream_response(cast(Any, handler.stream_stream)), **kwargs
        )
    return handler


class WrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """A server interceptor that wraps each method's handler, built once per method: subclasses say how
    (`wrap`). grpc returns the same handler object for a method on every call, so closures and the handler
    tuple are not rebuilt per call (profiled: they showed)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return handler
        return self.wrapped(handler, handler_call_details.method)

    def wrapped(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """`wrap(handler, method)`, built once per method and handler."""
        entry = self._cache.get(method)
        if entry is not None and entry[0] is handler:
            return entry[1]
        wrapped = self.wrap(handler, method)
        if len(self._cache) >= 4096:  # methods are few; a flood of names must not grow memory
            self._cache.clear()
        self._cache[method] = (handler, wrapped)
        return wrapped


class Layer:
    """A check a service adds to the kit's chain (`MeshServer(..., layers=[...])`), run after authorisation
    and decoding, before the handler, with the decoded request and the raw bytes it was decoded from.

    Override `before`; override `for_method` to configure the check per method or leave a method out (None),
    at no cost per call. `before` may raise a DomainError (the chain's error layer maps it to its status)
    or abort the call itself."""

    def for_method(self, method: str) -> RequestCheck | None:
        """This layer's check for `method`, asked once per method when the chain is built."""
        return self.before

    async def before(self, context: Context, request: Any, raw: bytes) -> None:
        """Runs once per request message; returning lets the call go on."""
        raise NotImplementedError

    def after_for_method(self, method: str) -> After | None:
        """This layer's hook after `method`'s handler (see the module), asked once per method; None (the
        default): nothing after the handler, at no cost per call."""
        return None


# --- decoding -----------------------------------------------------------------------------------------------

MALFORMED_REQUEST: Final = "MALFORMED_REQUEST"
UNDEFINED_ENUM_VALUE: Final = "UNDEFINED_ENUM_VALUE"
_MAX_VIOLATIONS: Final = 10  # a status names at most this many fields; the first one is enough to act on

# A step of an enum plan: (field name, kind, valid numbers or nested message descriptor)
_ENUM, _ENUM_LIST, _ENUM_MAP, _MSG, _MSG_LIST, _MSG_MAP = range(6)
_Plan = list[tuple[str, int, Any]]
_plans: dict[Descriptor, _Plan] = {}  # message type → its plan (empty: no enum field anywhere below it)
_plans_lock = threading.Lock()


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _children(descriptor: Descriptor) -> list[Descriptor]:
    out = []
    for field in descriptor.fields:
        if field.message_type is None:
            continue
        out.append(
            field.message_type.fields_by_name["value"].message_type if _is_map(field) else field.message_type
        )
    return [d for d in out if d is not None]


def _direct_enum(descriptor: Descriptor) -> bool:
    for field in descriptor.fields:
        if field.enum_type is not None:
            return True
        if _is_map(field) and field.message_type.fields_by_name["value"].enum_type is not None:
            return True
    return False


def _build_plans(root: Descriptor) -> None:
    """Plans for `root` and every message type reachable from it (recursive types included)."""
    reachable: list[Descriptor] = []
    seen: set[Descriptor] = set()
    stack = [root]
    while stack:
        desc = stack.pop()
        if desc in seen or desc in _plans:
            continue
        seen.add(desc)
        reachable.append(desc)
        stack.extend(_children(desc))
    # has_enum: a fixed point, so that cycles (a message that contains itself) are decided correctly
    has = {desc: _direct_enum(desc) for desc in reachable}

    def has_enum(desc: Descriptor) -> bool:
        known = has.get(desc)
        return bool(_plans[desc]) if known is None else known

    changed = True
    while changed:
        changed = False
        for desc in reachable:
            if not has[desc] and any(has_enum(child) for child in _children(desc)):
                has[desc] = changed = True
    for desc in reachable:
        plan: _Plan = []
        if has[desc]:
            for field in desc.fields:
                if _is_map(field):
                    value = field.message_type.fields_by_name["value"]
                    if value.enum_type is not None:
                        plan.append((field.name, _ENUM_MAP, frozenset(value.enum_type.values_by_number)))
                    elif value.message_type is not None and has_enum(value.message_type):
                        plan.append((field.name, _MSG_MAP, value.message_type))
                elif field.enum_type is not None:
                    numbers = frozenset(field.enum_type.values_by_number)
                    plan.append((field.name, _ENUM_LIST if _repeated(field) else _ENUM, numbers))
                elif field.message_type is not None and has_enum(field.message_type):
                    kind = _MSG_LIST if _repeated(field) else _MSG
                    plan.append((field.name, kind, field.message_type))
        _plans[desc] = plan


def _key(key: object) -> str:
    return json.dumps(key) if isinstance(key, str) else str(key)


def _undefined(message: Message, plan: _Plan, prefix: str, out: list[str]) -> None:
    """Append to `out` the paths of enum fields holding an undefined value (stops at _MAX_VIOLATIONS).
    Runs on every request: an empty repeated field or map costs one attribute read and a length test, a full
    list of defined values one C-level subset test."""
    for name, kind, arg in plan:
        if len(out) >= _MAX_VIOLATIONS:
            return
        if kind == _ENUM:
            if getattr(message, name) not in arg:
                out.append(prefix + name)
            continue
        if kind == _MSG:
            if message.HasField(name):
                _undefined(getattr(message, name), _plans[arg], f"{prefix}{name}.", out)
            continue
        container = getattr(message, name)
        if not container:
            continue
        if kind == _ENUM_LIST:
            if arg.issuperset(container):
                continue
            for i, value in enumerate(container):
                if value not in arg:
                    out.append(f"{prefix}{name}[{i}]")
                    if len(out) >= _MAX_VIOLATIONS:
                        return
        elif kind == _MSG_LIST:
            sub = _plans[arg]
            for i, item in enumerate(container):
                _undefined(item, sub, f"{prefix}{name}[{i}].", out)
                if len(out) >= _MAX_VIOLATIONS:
                    return
        elif kind == _ENUM_MAP:
            for key in container:  # the map's own iteration (its .items() is a Python-level view)
                if container[key] not in arg:
                    out.append(f"{prefix}{name}[{_key(key)}]")
                    if len(out) >= _MAX_VIOLATIONS:
                        return
        else:  # _MSG_MAP
            sub = _plans[arg]
            for key in container:
                _undefined(container[key], sub, f"{prefix}{name}[{_key(key)}].", out)
                if len(out) >= _MAX_VIOLATIONS:
                    return


def undefined_enum_paths(message: Message) -> list[str]:
    """Field paths of `message` whose enum value the enum does not define (at most 10), [] when none."""
    plan = enum_plan(message.DESCRIPTOR)
    out: list[str] = []
    if plan:
        _undefined(message, plan, "", out)
    return out


def enum_plan(descriptor: Descriptor) -> _Plan:
    """The cached enum plan of a message type (empty: no enum field anywhere in it)."""
    plan = _plans.get(descriptor)
    if plan is None:
        with _plans_lock:
            _build_plans(descriptor)
        plan = _plans[descriptor]
    return plan


def request_decoder(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The chain's decode step for a method whose handler had `deserializer`, built once per method:
    raw bytes → the request, or InvalidArgument (malformed body, undefined enum value). None when the handler
    takes bytes (no deserializer)."""
    if deserializer is None:
        return None
    try:
        sample = deserializer(b"")
    except Exception:
        sample = None
    if not isinstance(sample, Message):
        return _plain_decoder(deserializer, "request")
    descriptor = sample.DESCRIPTOR
    full_name = descriptor.full_name
    plan = enum_plan(descriptor)
    if not plan:
        return _plain_decoder(deserializer, full_name)

    def decode(raw: bytes) -> Any:
        try:
            message = deserializer(raw)
        except Exception:
            raise _malformed(full_name) from None
        out: list[str] = []
        _undefined(message, plan, "", out)
        if out:
            raise InvalidArgument(
                [FieldViolation(path, "is not a defined enum value") for path in out],
                reason=UNDEFINED_ENUM_VALUE,
            )
        return message

    return decode


def _malformed(full_name: str) -> InvalidArgument:
    return InvalidArgument(
        FieldViolation("request", f"the body is not a valid {full_name} message"), reason=MALFORMED_REQUEST
    )


def _plain_decoder(deserializer: Callable[[bytes], Any], full_name: str) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:
            raise _malformed(full_name) from None

    return decode


def decoding(
    handler: grpc.RpcMethodHandler[Any, Any],
    checks: Sequence[RequestCheck] = (),
    afters: Sequence[After] = (),
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` rebuilt to take raw request bytes (no deserializer): it decodes each request itself, runs
    `checks(context, request, raw)` on it, then the behaviour with the decoded request, then `afters` (see the
    module; none: the handler is built without them)."""
    decode = request_decoder(handler.request_deserializer)
    checks = tuple(checks)
    if afters:
        return _with_afters(decoding(handler, checks), tuple(afters))
    if decode is None and not checks:
        return handler  # a handler of bytes with nothing to check: nothing to do per call

    def unary_request(raw: bytes) -> Any:
        return raw if decode is None else decode(raw)

    def unary(behavior: Behaviour) -> Behaviour:
        if handler.stream_unary is not None:
            return _streamed_requests(behavior, unary_request, checks, generator=False)
        if checks:

            async def checked(raw: bytes, context: Context) -> Any:
                request = unary_request(raw)
                for check in checks:
                    await check(context, request, raw)
                return await behavior(request, context)

            return checked
        assert decode is not None

        async def decoded(raw: bytes, context: Context) -> Any:
            return await behavior(decode(raw), context)

        return decoded

    def streaming(behavior: Behaviour) -> Behaviour:
        if handler.stream_stream is not None:
            return _streamed_requests(behavior, unary_request, checks, generator=True)
        if inspect.iscoroutinefunction(behavior):  # writes with context.write()
            return unary_coroutine(behavior)

        async def run(raw: bytes, context: Context) -> AsyncIterator[Any]:
            request = unary_request(raw)
            for check in checks:
                await check(context, request, raw)
            async for item in behavior(request, context):
                yield item

        return run

    def unary_coroutine(behavior: Behaviour) -> Behaviour:
        async def run(raw: bytes, context: Context) -> Any:
            request = unary_request(raw)
            for check in checks:
                await check(context, request, raw)
            return await behavior(request, context)

        return run

    return rebuild(handler, unary_response=unary, stream_response=streaming, request_deserializer=None)


def _streamed_requests(
    behavior: Behaviour,
    decode: Callable[[bytes], Any],
    checks: tuple[RequestCheck, ...],
    *,
    generator: bool,
) -> Behaviour:
    async def checked(raw: bytes, context: Context) -> Any:
        request = decode(raw)
        for check in checks:
            await check(context, request, raw)
        return request

    async def requests(raws: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
        async for raw in raws:
            yield await checked(raw, context)

    async def opened(raws: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
        """With checks, the handler starts only once the first message has passed them: a stream that ends
        before its first message is refused, so no handler of a checked method ever runs unchecked (a guard's
        principal is always set)."""
        if not checks:
            return requests(raws, context)
        iterator = aiter(raws)
        try:
            first_raw = await anext(iterator)
        except StopAsyncIteration:
            raise InvalidArgument.field("request", "at least one request message is required") from None
        first = await checked(first_raw, context)

        async def rest() -> AsyncIterator[Any]:
            yield first
            async for request in requests(iterator, context):
                yield request

        return rest()

    if generator and inspect.isasyncgenfunction(behavior):

        async def stream(raws: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
            async for item in behavior(await opened(raws, context), context):
                yield item

        return stream

    async def run(raws: AsyncIterator[bytes], context: Context) -> Any:
        return await behavior(await opened(raws, context), context)

    return run


async def _run_afters(
    afters: tuple[After, ...], context: Context, error: BaseException | None, done: bool
) -> None:
    for after in afters:
        await after(context, error, done)


def _with_afters(
    handler: grpc.RpcMethodHandler[Any, Any], afters: tuple[After, ...]
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` (already decoding and checking) with `afters` run around its behaviour (see the module)."""

    def unary(behavior: Behaviour) -> Behaviour:
        async def run(request: Any, context: Context) -> Any:
            try:
                response = await behavior(request, context)
            except Exception as error:
                await _run_afters(afters, context, error, True)
                raise
            await _run_afters(afters, context, None, True)
            return response

        return run

    def streaming(behavior: Behaviour) -> Behaviour:
        if not inspect.isasyncgenfunction(behavior):  # a streaming response written with context.write()
            return unary(behavior)

        async def run(request: Any, context: Context) -> AsyncIterator[Any]:
            held = True
            try:
                async for item in behavior(request, context):
                    if held:
                        await _run_afters(afters, context, None, False)
                        held = False
                    yield item
            except Exception as error:
                await _run_afters(afters, context, error, True)
                raise
            await _run_afters(afters, context, None, True)

        return run

    return rebuild(handler, unary_response=unary, stream_response=streaming)


class ChainInterceptor(WrappingInterceptor):
    """The kit's layers as ONE grpc interceptor, outermost first, then the decode step, then the request
    layers (see the module docstring): grpc.aio awaits each interceptor's `intercept_service` on every call,
    so a chain of three cost three coroutines and continuations per call; composed, the wrapped handler is
    built once per method and the call pays one. `ChainedRegistration` mounts the same chain with no
    interceptor at all (what MeshServer does)."""

    def __init__(self, layers: Sequence[WrappingInterceptor], request_layers: Sequence[Layer] = ()) -> None:
        super().__init__()
        self.layers = list(layers)
        self.request_layers = list(request_layers)

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        checks = [c for layer in self.request_layers if (c := layer.for_method(method)) is not None]
        afters = [a for layer in self.request_layers if (a := layer.after_for_method(method)) is not None]
        handler = decoding(handler, checks, afters)  # takes raw bytes from here outwards
        for layer in reversed(self.layers):  # innermost wraps first
            handler = layer.wrap(handler, method)
        return handler


class _ChainedGenericHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # generic in the stubs only
    """A generic handler whose method handlers come out of `chain`, wrapped once per method."""

    def __init__(self, inner: grpc.GenericRpcHandler[Any, Any], chain: WrappingInterceptor) -> None:
        self._inner = inner
        self._chain = chain

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return None
        hand_over(handler_call_details.invocation_metadata)
        return self._chain.wrapped(handler, handler_call_details.method)


class _MethodTable(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # generic in the stubs only
    """The chain's wrapped handlers by full method name ("/pkg.Service/Method"), served as one generic handler."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self.handlers.get(handler_call_details.method)
        if handler is not None:
            hand_over(handler_call_details.invocation_metadata)
        return handler


class ChainedRegistration:
    """A grpc.aio server as the generated ``add_<Service>Servicer_to_server`` functions see it: every method
    handler they register is wrapped by `chain` once, at registration, and handed to the real server.

    The same chain as `ChainInterceptor`, without grpc's interceptor machinery on every call (a coroutine per
    interceptor, a continuation and the handler lookup through it: about 5 % of a bare echo's server CPU).

    The methods the generated code would register with grpc one by one are served instead by ONE generic handler
    (a dict lookup per call), first in grpc's lookup order as registered methods are. grpc.aio's server keeps a
    pending request for each registered method and waits on all of them (`asyncio.wait`) for every call it
    accepts, so a service's every call paid for each of its methods; served as one generic handler, the server
    waits on one. The lookup also hands the call's metadata, which grpc builds for it, to `call_metadata`
    (`tradeguard.rpc.metadata`), so that it is not built a second time. Generic handlers a service registers
    itself are wrapped too, after the table."""

    def __init__(self, server: grpc.aio.Server, chain: WrappingInterceptor) -> None:
        self._server = server
        self._chain = chain
        self._table = _MethodTable()
        server.add_generic_rpc_handlers((self._table,))

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_ChainedGenericHandler(handler, self._chain) for handler in generic_rpc_handlers)
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        for name, handler in method_handlers.items():
            method = f"/{service_name}/{name}"
            if method in self._table.handlers:
                raise ValueError(f"{method} is registered twice")
            self._table.handlers[method] = self._chain.wrap(handler, method)

    def as_server(self) -> grpc.aio.Server:
        """This object where a generated registration function's signature wants a server (it calls only the
        two methods above)."""
        return cast(grpc.aio.Server, self)
