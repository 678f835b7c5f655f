"""Every RPC of tradeguard.audit.v1.AuditService over mutual TLS, on the real service (SQLite, the real key vault
signing its checkpoints): appends (durable answers, idempotent retries, conflicts, every bad field named, masking),
the policy (a workload not allowed is PERMISSION_DENIED), entries as stored, queries with opaque tamper-checked
page tokens, proofs verified by code in this test (an RFC 9162 verifier written here; the service's tree module is
not imported), checkpoints, and Tail: from the middle of the log, new appends as they commit, resumed after a
disconnect with no gap and no duplicate."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import sqlite3
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from tests.services.audit.test_service import (
    CALL_S,
    Audit,
    event,
    latest_checkpoint,
    open_checkpoint,
    running_audit,
    stub,
)
from tradeguard.audit import tlog
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.mesh import pki
from tradeguard.testing import rich_status

SERVICE = "tradeguard.audit.v1.AuditService"
TRADING = "spiffe://tradeguard.test/svc/trading"


@pytest.fixture
async def audit(pki_paths: pki.PkiPaths) -> AsyncIterator[Audit]:
    async with running_audit(pki_paths) as running:
        yield running


async def failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    return failed.value


def fields_of(error: grpc.aio.AioRpcError) -> list[str]:
    status = rich_status(error)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT, status
    return [v.field for v in status.field_violations]


def leaf(entry_bytes: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry_bytes).digest()


def node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2, written here (independent of the service's tree module)."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


async def append_many(audit: Audit, ids: Sequence[str], **fields: Any) -> list[pb.Appended]:
    async with audit.channel("trading") as channel:
        reply = await stub(channel).AppendBatch(
            pb.AppendBatchRequest(events=[event(i, **fields) for i in ids]), timeout=CALL_S
        )
    return list(reply.appended)


# --- appending ------------------------------------------------------------------------------------------------


async def test_append_answers_the_durable_entry_and_retries_are_idempotent(audit: Audit) -> None:
    async with audit.channel("trading") as channel, audit.channel("ops") as ops:
        client = stub(channel)
        first = (await client.Append(pb.AppendRequest(event=event("ev-1")), timeout=CALL_S)).appended
        assert first.sequence == 0 and first.created and len(first.leaf_hash) == 32
        again = (await client.Append(pb.AppendRequest(event=event("ev-1")), timeout=CALL_S)).appended
        assert again == pb.Appended(sequence=0, leaf_hash=first.leaf_hash, created=False)
        conflict = await failure(
            client.Append(pb.AppendRequest(event=event("ev-1", resource="ord-2")), timeout=CALL_S)
        )
        status = rich_status(conflict)
        assert status.code == grpc.StatusCode.ALREADY_EXISTS and status.reason == "EVENT_ID_CONFLICT"
        assert "event.event_id" in status.message
        (stored,) = (
            await stub(ops).GetEntries(pb.GetEntriesRequest(start=0, count=10), timeout=CALL_S)
        ).entries
    assert stored.sequence == 0 and stored.leaf_hash == first.leaf_hash == leaf(stored.entry_bytes)
    assert pb.Entry.FromString(stored.entry_bytes) == stored.entry
    assert stored.entry.recorder == TRADING  # from the caller's certificate, not from the request
    assert stored.entry.event.event_id == "ev-1" and stored.entry.event.resource == "ord-1"
    assert stored.entry.HasField("record_time")


async def test_a_batch_is_answered_in_order_and_names_each_conflict(audit: Audit) -> None:
    appended = await append_many(audit, ["b-0", "b-1", "b-2"])
    assert [(a.sequence, a.created) for a in appended] == [(0, True), (1, True), (2, True)]
    async with audit.channel("auth") as channel:  # another recorder: its own event ids
        other = await stub(channel).AppendBatch(
            pb.AppendBatchRequest(events=[event("b-0"), event("b-3")]), timeout=CALL_S
        )
        assert [(a.sequence, a.created) for a in other.appended] == [(3, True), (4, True)]
    async with audit.channel("trading") as channel:
        conflict = await failure(
            stub(channel).AppendBatch(
                pb.AppendBatchRequest(
                    events=[
                        event("b-1"),
                        event("b-2", method="/other"),
                        event("b-new"),
                        event("b-0", action="x"),
                    ]
                ),
                timeout=CALL_S,
            )
        )
        status = rich_status(conflict)
        assert status.code == grpc.StatusCode.ALREADY_EXISTS and status.reason == "EVENT_ID_CONFLICT"
        assert "events[1].event_id" in status.message and "events[3].event_id" in status.message
        assert "events[0]" not in status.message and "events[2]" not in status.message
        # the batch's other events are recorded: a retry of them answers them
        retry = await stub(channel).AppendBatch(
            pb.AppendBatchRequest(events=[event("b-1"), event("b-new")]), timeout=CALL_S
        )
        assert [(a.sequence, a.created) for a in retry.appended] == [(1, False), (5, False)]


async def test_every_bad_field_is_named_and_nothing_is_appended(audit: Audit) -> None:
    async with audit.channel("trading") as channel:
        client = stub(channel)
        empty = await failure(client.Append(pb.AppendRequest(), timeout=CALL_S))
        assert sorted(fields_of(empty)) == ["event.event_id", "event.outcome", "event.time"]
        bad_id = await failure(client.Append(pb.AppendRequest(event=event("has space")), timeout=CALL_S))
        assert fields_of(bad_id) == ["event.event_id"] and "has space" not in (bad_id.details() or "")
        unknown = await failure(client.Append(pb.AppendRequest(event=event("e", outcome=99)), timeout=CALL_S))
        assert fields_of(unknown) == ["event.outcome"]
        old = timestamp_pb2.Timestamp(seconds=100)
        assert fields_of(
            await failure(client.Append(pb.AppendRequest(event=event("e", time=old)), timeout=CALL_S))
        ) == ["event.time"]
        none = await failure(client.AppendBatch(pb.AppendBatchRequest(), timeout=CALL_S))
        assert fields_of(none) == ["events"]
        many = await failure(
            client.AppendBatch(
                pb.AppendBatchRequest(events=[event(f"m-{i}") for i in range(1001)]), timeout=CALL_S
            )
        )
        assert fields_of(many) == ["events"]
        mixed = await failure(
            client.AppendBatch(
                pb.AppendBatchRequest(
                    events=[
                        event("ok-0"),
                        event(""),
                        event("ok-2", outcome=pb.OUTCOME_UNSPECIFIED),
                        event("ok-3"),
                    ]
                ),
                timeout=CALL_S,
            )
        )
        assert fields_of(mixed) == ["events[1].event_id", "events[2].outcome"]
    async with audit.channel("ops") as ops:
        entries = await stub(ops).GetEntries(pb.GetEntriesRequest(start=0, count=10), timeout=CALL_S)
    assert list(entries.entries) == []  # a batch with one bad event appends none of it


async def test_secrets_are_masked_before_they_are_stored(audit: Audit) -> None:
    secret = "hunter2-correct-horse-battery"
    token = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ1c3JfYWxpY2UifQ.c2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJl"
    sent = event("masked", resource=token)
    sent.details["password"] = secret
    sent.details["note"] = "kept"
    async with audit.channel("trading") as channel, audit.channel("ops") as ops:
        await stub(channel).Append(pb.AppendRequest(event=sent), timeout=CALL_S)
        (stored,) = (
            await stub(ops).GetEntries(pb.GetEntriesRequest(start=0, count=1), timeout=CALL_S)
        ).entries
    assert secret.encode() not in stored.entry_bytes and token.encode() not in stored.entry_bytes
    assert stored.entry.event.details["note"] == "kept" and "password" in stored.entry.event.details


# --- the policy -----------------------------------------------------------------------------------------------


REQUESTS: dict[str, Any] = {
    "Append": pb.AppendRequest(event=event("p-1")),
    "AppendBatch": pb.AppendBatchRequest(events=[event("p-2")]),
    "GetCheckpoint": pb.GetCheckpointRequest(),
    "ListCheckpoints": pb.ListCheckpointsRequest(),
    "GetInclusionProof": pb.GetInclusionProofRequest(),
    "GetConsistencyProof": pb.GetConsistencyProofRequest(first_size=1, second_size=1),
    "GetEntries": pb.GetEntriesRequest(count=1),
    "Query": pb.QueryRequest(),
    "Tail": pb.TailRequest(),
}


async def _code(channel: grpc.aio.Channel, method: str) -> grpc.StatusCode:
    request = REQUESTS[method]
    try:
        if method == "Tail":  # the log is not empty: an allowed caller reads its first entry
            call = stub(channel).Tail(request, timeout=CALL_S)
            await call.read()
            call.cancel()
            return grpc.StatusCode.OK
        await getattr(stub(channel), method)(request, timeout=CALL_S)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_the_policy_denies_every_workload_not_listed(audit: Audit) -> None:
    assert set(REQUESTS) == {m.name for m in pb.DESCRIPTOR.services_by_name["AuditService"].methods}
    allowed = {"Append": {"trading", "auth", "keyvault", "ratelimit", "monitor"}}
    allowed["AppendBatch"] = allowed["Append"]
    denied = grpc.StatusCode.PERMISSION_DENIED
    await append_many(audit, ["first"])
    for caller in ("ops", "monitor", "trading", "auth", "keyvault", "ratelimit", "edge"):
        async with audit.channel(caller) as channel:
            for method in REQUESTS:
                may = allowed.get(method, {"ops", "monitor"})
                code = await _code(channel, method)
                if caller in may:
                    assert code != denied, (caller, method)
                else:
                    assert code == denied, (caller, method)


async def test_the_tail_of_a_workload_not_allowed_is_refused(audit: Audit) -> None:
    async with audit.channel("trading") as channel:
        call = stub(channel).Tail(pb.TailRequest(start=0), timeout=CALL_S)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


# --- reading --------------------------------------------------------------------------------------------------


async def test_get_entries_answers_them_as_stored(audit: Audit) -> None:
    appended = await append_many(audit, [f"g-{i}" for i in range(5)])
    async with audit.channel("ops") as ops:
        client = stub(ops)
        middle = (await client.GetEntries(pb.GetEntriesRequest(start=1, count=3), timeout=CALL_S)).entries
        assert [e.sequence for e in middle] == [1, 2, 3]
        assert [e.leaf_hash for e in middle] == [a.leaf_hash for a in appended[1:4]]
        assert all(leaf(e.entry_bytes) == e.leaf_hash for e in middle)
        tail = (await client.GetEntries(pb.GetEntriesRequest(start=4, count=10), timeout=CALL_S)).entries
        assert [e.sequence for e in tail] == [4]  # fewer at the end of the log
        beyond = (await client.GetEntries(pb.GetEntriesRequest(start=9, count=1), timeout=CALL_S)).entries
        assert list(beyond) == []
        for request, field in (
            (pb.GetEntriesRequest(start=-1, count=1), "start"),
            (pb.GetEntriesRequest(start=0, count=0), "count"),
            (pb.GetEntriesRequest(start=0, count=1001), "count"),
        ):
            assert fields_of(await failure(client.GetEntries(request, timeout=CALL_S))) == [field]


def _ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


async def test_query_filters_and_pages_with_opaque_checked_tokens(audit: Audit) -> None:
    base = 1_764_500_000
    await append_many(audit, [f"q-a{i}" for i in range(5)], principal="usr_alice", time=_ts(base + 10))
    await append_many(
        audit, ["q-b0"], principal="usr_bob", time=_ts(base + 20), outcome=pb.OUTCOME_DENIED_QUOTA
    )
    await append_many(audit, ["q-b1"], principal="usr_bob", api_key_id="tgk_other", time=_ts(base + 30))
    async with audit.channel("ops") as ops:
        client = stub(ops)

        async def ids(**fields: Any) -> list[str]:
            reply = await client.Query(pb.QueryRequest(**fields), timeout=CALL_S)
            return [e.entry.event.event_id for e in reply.entries]

        assert await ids(principal="usr_bob") == ["q-b0", "q-b1"]
        assert await ids(principal="usr_bob", outcome=pb.OUTCOME_DENIED_QUOTA) == ["q-b0"]
        assert await ids(api_key_id="tgk_other") == ["q-b1"]
        assert await ids(account_id="acct-1", method="/tradeguard.trading.v1.TradingService/PlaceOrder") == [
            *(f"q-a{i}" for i in range(5)),
            "q-b0",
            "q-b1",
        ]
        assert await ids(start_time=_ts(base + 20), end_time=_ts(base + 30)) == ["q-b0"]
        assert await ids(method="/other") == []
        # pages of two, oldest first, until the token is empty
        request = pb.QueryRequest(principal="usr_alice", page_size=2)
        pages: list[list[str]] = []
        tokens: list[str] = []
        while True:
            reply = await client.Query(request, timeout=CALL_S)
            pages.append([e.entry.event.event_id for e in reply.entries])
            if not reply.next_page_token:
                break
            tokens.append(reply.next_page_token)
            request.page_token = reply.next_page_token
        assert pages == [["q-a0", "q-a1"], ["q-a2", "q-a3"], ["q-a4"]]
        # a token altered, made up, or presented with another query is refused, naming page_token
        token = tokens[0]
        altered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
        for bad in (
            pb.QueryRequest(principal="usr_alice", page_token=altered),
            pb.QueryRequest(principal="usr_alice", page_token="1"),
            pb.QueryRequest(principal="usr_alice", page_token="not a token at all!!!!!"),
            pb.QueryRequest(principal="usr_bob", page_token=token),  # another query's token
        ):
            error = await failure(client.Query(bad, timeout=CALL_S))
            assert fields_of(error) == ["page_token"]
        bad_fields = await failure(
            client.Query(
                pb.QueryRequest(
                    principal="x" * 1025, start_time=_ts(base + 30), end_time=_ts(base), page_size=1001
                ),
                timeout=CALL_S,
            )
        )
        assert fields_of(bad_fields) == ["principal", "end_time", "page_size"]
        unknown = pb.QueryRequest()
        unknown.outcome = 42  # type: ignore[assignment]  # an outcome this API does not have
        assert fields_of(await failure(client.Query(unknown, timeout=CALL_S))) == ["outcome"]


# --- checkpoints and proofs -----------------------------------------------------------------------------------


async def test_proofs_need_a_checkpoint_and_stay_within_it(audit: Audit) -> None:
    async with audit.channel("ops") as ops:
        client = stub(ops)
        early = await failure(client.GetInclusionProof(pb.GetInclusionProofRequest(), timeout=CALL_S))
        status = rich_status(early)
        assert status.code == grpc.StatusCode.FAILED_PRECONDITION and status.reason == "NO_CHECKPOINT"
        await append_many(audit, [f"i-{i}" for i in range(3)])
        signed = (await latest_checkpoint(audit, 3)).tree_size
        for request, field in (
            (pb.GetInclusionProofRequest(sequence=-1), "sequence"),
            (pb.GetInclusionProofRequest(sequence=0, tree_size=-1), "tree_size"),
            (pb.GetInclusionProofRequest(sequence=0, tree_size=signed + 1), "tree_size"),
            (pb.GetInclusionProofRequest(sequence=2, tree_size=2), "sequence"),
        ):
            assert fields_of(await failure(client.GetInclusionProof(request, timeout=CALL_S))) == [field]
        for consistency, field in (
            (pb.GetConsistencyProofRequest(first_size=0, second_size=2), "first_size"),
            (pb.GetConsistencyProofRequest(first_size=2, second_size=1), "second_size"),
            (pb.GetConsistencyProofRequest(first_size=1, second_size=signed + 1), "second_size"),
        ):
            assert fields_of(await failure(client.GetConsistencyProof(consistency, timeout=CALL_S))) == [
                field
            ]
        same = await client.GetConsistencyProof(
            pb.GetConsistencyProofRequest(first_size=2, second_size=2), timeout=CALL_S
        )
        assert list(same.hashes) == []
        for listing, field in (
            (pb.ListCheckpointsRequest(after_size=-1), "after_size"),
            (pb.ListCheckpointsRequest(page_size=1001), "page_size"),
        ):
            assert fields_of(await failure(client.ListCheckpoints(listing, timeout=CALL_S))) == [field]


async def test_every_inclusion_and_consistency_proof_verifies_against_signed_checkpoints(
    audit: Audit,
) -> None:
    keys = await audit.public_keys()
    sizes: list[int] = []
    checkpoints: dict[int, bytes] = {}
    appended: list[pb.Appended] = []
    for round_ in range(4):  # the log grows between checkpoints: 3, 8, 9, 17 entries
        appended += await append_many(audit, [f"r{round_}-{i}" for i in range((3, 5, 1, 8)[round_])])
        checkpoint = await latest_checkpoint(audit, len(appended))
        _, size, root = open_checkpoint(checkpoint.note, keys)
        assert size == len(appended) == checkpoint.tree_size and root == checkpoint.root_hash
        sizes.append(size)
        checkpoints[size] = root
    async with audit.channel("ops") as ops:
        client = stub(ops)
        entries = (await client.GetEntries(pb.GetEntriesRequest(start=0, count=100), timeout=CALL_S)).entries
        assert [leaf(e.entry_bytes) for e in entries] == [a.leaf_hash for a in appended]
        for size in sizes:
            for index in range(size):
                proof = await client.GetInclusionProof(
                    pb.GetInclusionProofRequest(sequence=index, tree_size=size), timeout=CALL_S
                )
                assert proof.tree_size == size and proof.leaf_hash == leaf(entries[index].entry_bytes)
                assert verify_inclusion(proof.leaf_hash, index, size, list(proof.hashes), checkpoints[size])
                assert not verify_inclusion(
                    leaf(b"forged"), index, size, list(proof.hashes), checkpoints[size]
                )
        latest = await client.GetInclusionProof(pb.GetInclusionProofRequest(sequence=4), timeout=CALL_S)
        assert latest.tree_size == sizes[-1]  # 0: the latest checkpoint's size
        listed = await client.ListCheckpoints(pb.ListCheckpointsRequest(), timeout=CALL_S)
        listed_sizes = [c.tree_size for c in listed.checkpoints]
        assert set(sizes) <= set(listed_sizes) and listed_sizes == sorted(set(listed_sizes))
        later = await client.ListCheckpoints(
            pb.ListCheckpointsRequest(after_size=8, page_size=1), timeout=CALL_S
        )
        assert [c.tree_size for c in later.checkpoints] == [min(s for s in listed_sizes if s > 8)]
        for c in listed.checkpoints:
            assert open_checkpoint(c.note, keys)[1:] == (c.tree_size, c.root_hash)
        for first, second in itertools.pairwise(listed.checkpoints):
            consistency = await client.GetConsistencyProof(
                pb.GetConsistencyProofRequest(first_size=first.tree_size, second_size=second.tree_size),
                timeout=CALL_S,
            )
            hashes = list(consistency.hashes)
            assert tlog.verify_consistency(
                first.tree_size, second.tree_size, hashes, first.root_hash, second.root_hash
            )
            assert not tlog.verify_consistency(
                first.tree_size, second.tree_size, hashes, leaf(b"x"), second.root_hash
            )


# --- Tail -----------------------------------------------------------------------------------------------------


async def _read(call: Any, count: int) -> list[pb.StoredEntry]:
    out = []
    for _ in range(count):
        message = await asyncio.wait_for(call.read(), CALL_S)
        assert isinstance(message, pb.TailResponse), message  # not the end of the stream
        out.append(message.entry)
    return out


async def test_tail_from_the_middle_follows_new_appends_and_resumes_without_gap_or_duplicate(
    audit: Audit,
) -> None:
    await append_many(audit, [f"t-{i}" for i in range(5)])
    async with audit.channel("monitor") as channel:
        client = stub(channel)
        call = client.Tail(pb.TailRequest(start=2), timeout=CALL_S)
        stored = await _read(call, 3)
        assert [e.sequence for e in stored] == [2, 3, 4]
        await append_many(audit, [f"t-{i}" for i in range(5, 8)])  # while the tail is open
        stored += await _read(call, 3)
        assert [e.sequence for e in stored] == [2, 3, 4, 5, 6, 7]
        call.cancel()  # the client goes away; more is appended meanwhile
        await append_many(audit, [f"t-{i}" for i in range(8, 10)])
        resumed = client.Tail(pb.TailRequest(start=stored[-1].sequence + 1), timeout=CALL_S)
        stored += await _read(resumed, 2)
        resumed.cancel()
        beyond = client.Tail(pb.TailRequest(start=12), timeout=CALL_S)  # past the end: it waits
        await append_many(audit, [f"t-{i}" for i in range(10, 13)])
        (twelfth,) = await _read(beyond, 1)
        beyond.cancel()
        assert fields_of(await failure(client.Tail(pb.TailRequest(start=-1), timeout=CALL_S).read())) == [
            "start"
        ]
    assert [e.sequence for e in stored] == list(range(2, 10)) and twelfth.sequence == 12
    assert [e.entry.event.event_id for e in stored] == [f"t-{i}" for i in range(2, 10)]
    assert all(leaf(e.entry_bytes) == e.leaf_hash for e in stored)


async def test_tail_under_concurrent_appends_sees_each_entry_once_in_order(audit: Audit) -> None:
    writers, each = 8, 25
    async with audit.channel("ops") as channel, audit.channel("trading") as recorder:
        call = stub(channel).Tail(pb.TailRequest(start=0), timeout=CALL_S)
        appender = stub(recorder)

        async def write(writer: int) -> None:
            for i in range(each):
                await appender.Append(pb.AppendRequest(event=event(f"c-{writer}-{i}")), timeout=CALL_S)

        reading = asyncio.create_task(_read(call, writers * each))
        await asyncio.gather(*(write(w) for w in range(writers)))
        stored = await reading
        call.cancel()
    assert [e.sequence for e in stored] == list(range(writers * each))
    assert sorted(e.entry.event.event_id for e in stored) == sorted(
        f"c-{w}-{i}" for w in range(writers) for i in range(each)
    )


async def test_after_an_attacker_rewrites_or_deletes_a_row_proofs_show_the_tree_and_tail_stops_at_the_hole(
    audit: Audit,
) -> None:
    """An attacker with the database drops the append-only triggers, rewrites entry 1 (bytes and hash together)
    and deletes entry 3: the inclusion proof still carries the leaf the signed tree holds (so it no longer matches
    the rewritten row), and a tail reaching the hole ends with DATA_LOSS (never skipping it, never retryable)."""
    await append_many(audit, [f"x-{i}" for i in range(5)])
    checkpoint = await latest_checkpoint(audit, 5)
    path = audit.service.running.settings.database_url.removeprefix("sqlite:///")
    forged = b"forged entry"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            db.execute(f'DROP TRIGGER "{name}"')
        db.execute(
            "UPDATE entries SET entry_bytes = ?, leaf_hash = ? WHERE sequence = 1", (forged, leaf(forged))
        )
        db.execute("DELETE FROM entries WHERE sequence = 3")
    async with audit.channel("ops") as ops:
        client = stub(ops)
        proof = await client.GetInclusionProof(
            pb.GetInclusionProofRequest(sequence=1, tree_size=checkpoint.tree_size), timeout=CALL_S
        )
        assert proof.leaf_hash != leaf(forged)
        assert verify_inclusion(proof.leaf_hash, 1, proof.tree_size, proof.hashes, checkpoint.root_hash)
        assert not verify_inclusion(leaf(forged), 1, proof.tree_size, proof.hashes, checkpoint.root_hash)
        tail = client.Tail(pb.TailRequest(start=2), timeout=CALL_S)
        (second,) = await _read(tail, 1)
        assert second.sequence == 2
        stopped = rich_status(await failure(tail.read()))
    assert (stopped.code, stopped.reason) == (grpc.StatusCode.DATA_LOSS, "LOG_DAMAGED")
