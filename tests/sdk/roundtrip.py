#!/usr/bin/env python3
"""The official EnSync Python SDK (ensync-sdk-ws 0.4.3, unchanged) against a
running ensync-server, over WebSocket. tests/sdk.rs runs it; by hand:

    python roundtrip.py keygen
    python roundtrip.py run --ws-url ws://127.0.0.1:7071 --tcp 127.0.0.1:7070 \
        --subscriber-id ... --subscriber-public ... --subscriber-secret ... \
        --publisher-id ... --publisher-public ...

with both public keys under [[clients]] in the server's config.

`run` connects a subscriber and a publisher with access keys, publishes
end-to-end encrypted events to the subscriber's public key, and checks that
the subscriber's handlers get them decrypted and in order, that the SDK's
auto-ack reaches the server (seen from a raw TCP connection, not through the
SDK), and that replaying one event by id returns it decrypted. It prints
each check as it passes and exits nonzero with the reason at the first
failure. Every wait is bounded, so it never hangs.
"""

import argparse
import asyncio
import base64
import hashlib
import json
import re
import sys
import time
import traceback

# How long any single step may take. The SDK's own reply timeout is 30 s;
# ours fires first so a lost reply fails fast with the step's name.
STEP_TIMEOUT = 10.0
# The whole `run`, steps and cleanup.
TOTAL_TIMEOUT = 45.0
# How long the server may take to make the auto-ack visible to REPLAY.
ACK_VISIBLE_TIMEOUT = 5.0

SDK_VERSION = "0.4.3"
# Two event names, one per subscription. NOTE: the SDK hands a record to a
# handler only when the record's name equals the subscribed name exactly
# (`messageName in self._subscriptions`), so a pattern like `sdk/*` would
# subscribe fine and then never call its handler: subscribe to exact names.
ORDER_EVENT = "sdk/order/placed"
SECRET_EVENT = "sdk/secret/shared"
SECRET_PAYLOAD = {
    "text": "for the subscriber's eyes only; not the server's",
    "amount": 42,
    "nested": {"list": [1, 2, 3], "flag": True},
}
# A piece of the plaintext that must never appear in what the server stores.
PLAINTEXT_MARK = "eyes only"


class CheckFailed(Exception):
    """A check that did not hold; the message says what was expected."""


def ok(what):
    print(f"ok: {what}", flush=True)


def check(cond, what, detail=""):
    if not cond:
        raise CheckFailed(f"{what}" + (f": {detail}" if detail else ""))
    ok(what)


def check_eq(got, expected, what):
    check(got == expected, what, f"expected {expected!r}, got {got!r}")


async def within(awaitable, what, seconds=STEP_TIMEOUT):
    """Awaits `awaitable`, failing with `what` if it takes over `seconds`."""
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except asyncio.TimeoutError:
        raise CheckFailed(f"timed out after {seconds:g} s waiting for {what}") from None


def keygen():
    """Prints two Ed25519 key pairs as the SDK uses them: the public key is
    base64 of the 32-byte verify key; the secret is base64 of the 64-byte
    NaCl secret key (seed followed by the public key)."""
    import nacl.signing

    def pair():
        sk = nacl.signing.SigningKey.generate()
        pk = bytes(sk.verify_key)
        return {
            "public": base64.b64encode(pk).decode(),
            "secret": base64.b64encode(bytes(sk) + pk).decode(),
        }

    print(json.dumps({"subscriber": pair(), "publisher": pair()}))


def verify_sdk_install():
    """The SDK under test is the pinned release, byte for byte as its wheels
    were published (the hashes in their RECORD files), so a patched copy in
    an ENSYNC_SDK_PYTHON environment cannot pass for it."""
    from importlib import metadata

    for dist_name, version in (("ensync-sdk-ws", SDK_VERSION), ("ensync-core", None)):
        dist = metadata.distribution(dist_name)
        if version is not None:
            check_eq(dist.version, version, f"{dist_name} is version {version}")
        checked = 0
        for f in dist.files or []:
            if f.hash is None or not str(f).endswith(".py"):
                continue
            digest = hashlib.new(f.hash.mode, f.locate().read_bytes()).digest()
            got = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
            if got != f.hash.value:
                raise CheckFailed(f"{dist_name}: {f} differs from the published wheel")
            checked += 1
        check(checked > 0, f"{dist_name} {dist.version}: {checked} source files match the published wheel")
    import nacl
    import websockets

    print(f"info: websockets {websockets.__version__}, PyNaCl {nacl.__version__}, "
          f"Python {sys.version.split()[0]}", flush=True)


def published_idem(reply):
    """The IDEM of the SDK's publish() result: the server's PUB reply."""
    m = re.fullmatch(r"\+PASS:PUBLISHED;IDEM=(evt_[0-9a-f]{24});TIMESTAMP=\d+", reply)
    if not m:
        raise CheckFailed(f"publish() returned {reply!r}, not one +PASS:PUBLISHED reply")
    return m.group(1)


class RawLine:
    """A bare TCP line client: the server's own view of the client's state,
    independent of the SDK and of WebSocket."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host, port):
        reader, writer = await within(asyncio.open_connection(host, port), "raw TCP connect")
        return cls(reader, writer)

    async def line(self):
        while True:
            raw = await within(self.reader.readline(), "a line on the raw TCP connection")
            if not raw.endswith(b"\n"):
                raise CheckFailed(f"server closed the raw TCP connection (got {raw!r})")
            line = raw[:-1].decode()
            if line == "PING":
                self.writer.write(b"PONG\n")
                continue
            return line

    async def command(self, text):
        self.writer.write(text.encode() + b"\n")
        await within(self.writer.drain(), f"sending {text!r}")
        reply = await self.line()
        if reply.startswith("+RECORD:"):
            # Everything addressed to the client is settled or in flight on
            # the SDK's connection by now: a delivery here is a redelivery.
            raise CheckFailed(f"unexpected delivery on the raw connection after {text!r}: {reply}")
        return reply

    async def replay(self, client_id, name, only_unacked):
        text = (f"REPLAY;CLIENT_ID={client_id};EVENT_NAME={name};FROM_POSITION=earliest"
                f";ONLY_UNACKED={'true' if only_unacked else 'false'}")
        header = await self.command(text)
        m = re.fullmatch(r"\+PASS:REPLAY_STARTED;EVENT_NAME=(.*);COUNT=(\d+)", header)
        if not m or m.group(1) != name:
            raise CheckFailed(f"{text!r} got {header!r}")
        records = []
        for _ in range(int(m.group(2))):
            line = await self.line()
            if not line.startswith("+RECORD:"):
                raise CheckFailed(f"expected a replayed +RECORD: after {header!r}, got {line!r}")
            records.append(json.loads(line[len("+RECORD:"):]))
        return records

    async def close(self):
        self.writer.close()
        await within(self.writer.wait_closed(), "closing the raw TCP connection")


def stored_ciphertext(payload):
    """Checks the payload the server returns is the SDK's envelope untouched:
    base64 of JSON {nonce, ciphertext, ephemeralPublicKey}, no plaintext."""
    check(isinstance(payload, str), "the stored payload is the SDK's base64 text, as a JSON string",
          f"got {payload!r}")
    envelope = json.loads(base64.b64decode(payload, validate=True))
    check_eq(sorted(envelope), ["ciphertext", "ephemeralPublicKey", "nonce"],
             "the stored payload is the SDK's single-recipient envelope")
    check(PLAINTEXT_MARK not in payload and PLAINTEXT_MARK not in json.dumps(envelope),
          "the server holds no plaintext of the payload")


async def run(args):
    from ensync_sdk_ws import EnSyncEngine

    verify_sdk_install()
    host, port = args.tcp.rsplit(":", 1)
    sub_id, pub_id = args.subscriber_id, args.publisher_id
    sub_key, pub_key = args.subscriber_key or sub_id, args.publisher_key or pub_id
    sub_public, sub_secret = args.subscriber_public, args.subscriber_secret
    # The SDK's own log (decryption failures, handler errors) goes to
    # stderr, which tests/sdk.rs shows when the test fails.
    sdk_options = {"enableLogging": True}
    engines = []
    raw = None
    try:
        # 1. Connect with access keys (CONN;ACCESS_KEY=:...). The server maps
        # each key to its client id; clientHash is the configured public key.
        subscriber = EnSyncEngine(args.ws_url, sdk_options)
        engines.append(subscriber)
        await within(subscriber.create_client(sub_key, {"appSecretKey": sub_secret}),
                     "the subscriber's create_client")
        ok(f"subscriber connected over WebSocket as {sub_id}")
        check_eq(subscriber.get_client_public_key(), sub_public,
                 "subscriber get_client_public_key() is its configured public key")
        publisher = EnSyncEngine(args.ws_url, sdk_options)
        engines.append(publisher)
        await within(publisher.create_client(pub_key), "the publisher's create_client")
        ok(f"publisher connected over WebSocket as {pub_id}")
        check_eq(publisher.get_client_public_key(), args.publisher_public,
                 "publisher get_client_public_key() is its configured public key")

        # 2. Order: two events published in turn reach the handler in turn.
        # NOTE (SDK quirk): with auto-ack on, the handler's ACK is awaited by
        # the listener task itself, which is also the only reader of replies,
        # so the ACK's reply cannot be read and the connection stalls until
        # the SDK's 30 s reply timeout before the next record is handled.
        # Workaround: this subscription is auto_ack=False and its events are
        # acked from this task, whose replies the (free) listener reads.
        ordered = []
        both = asyncio.Event()
        order_sub = subscriber.subscribe(ORDER_EVENT, auto_ack=False, app_decrypt_key=sub_secret)

        @order_sub.handler
        async def on_order(message):
            ordered.append(message)
            if len(ordered) >= 2:
                both.set()

        # NOTE (SDK quirk): subscribe() only builds a decorator; SUB is sent
        # when its _ensure_subscription() is awaited, which returns the
        # WebSocketSubscription (ack, replay, ...).
        order_live = await within(order_sub._ensure_subscription(), f"SUB {ORDER_EVENT}")
        ok(f"subscribed to {ORDER_EVENT} (auto_ack=False)")
        # NOTE (SDK quirk): with several recipients publish() uses hybrid
        # encryption, which the SDK cannot decrypt; one recipient per publish.
        payloads = [{"seq": 1, "item": "first"}, {"seq": 2, "item": "second"}]
        idems = []
        for p in payloads:
            reply = await within(publisher.publish(ORDER_EVENT, [sub_public], p),
                                 f"publish {p} to the subscriber's public key")
            idems.append(published_idem(reply))
        ok(f"published {len(idems)} events to the subscriber's public key: {idems}")
        await within(both.wait(), "both events at the subscriber's handler")
        check_eq([m["idem"] for m in ordered], idems, "the handler got both events in publication order")
        check_eq([m["payload"] for m in ordered], payloads, "the handler got both payloads decrypted")
        blocks = [int(m["block"]) for m in ordered]
        check(blocks[0] < blocks[1], "their blocks increase", f"blocks {blocks}")
        for m in ordered:
            reply = await within(order_live.ack(m["idem"], m["block"]), f"ACK of {m['idem']}")
            check_eq(reply, f"+PASS:ACKNOWLEDGED;IDEM={m['idem']}", f"manual ack of {m['idem']}")

        # 3. One encrypted event, auto-acked by the SDK.
        received = []
        got = asyncio.Event()
        secret_sub = subscriber.subscribe(SECRET_EVENT, app_decrypt_key=sub_secret)  # auto_ack

        @secret_sub.handler
        async def on_secret(message):
            received.append(message)
            got.set()

        await within(secret_sub._ensure_subscription(), f"SUB {SECRET_EVENT}")
        ok(f"subscribed to {SECRET_EVENT} with a decrypt key (auto-ack on)")
        reply = await within(publisher.publish(SECRET_EVENT, [sub_public], SECRET_PAYLOAD),
                             "publish of the secret event")
        secret_idem = published_idem(reply)
        ok(f"published {secret_idem} encrypted to the subscriber's public key")
        await within(got.wait(), "the secret event at the subscriber's handler")
        message = received[0]
        check_eq(message["idem"], secret_idem, "the handler got the published event")
        check_eq(message["payload"], SECRET_PAYLOAD, "the handler got the payload decrypted")
        check_eq(message["sender"], pub_id, "the record names the publisher as sender")
        check_eq(message["messageName"], SECRET_EVENT, "the record carries the event name")
        # From here the subscriber's connection is stalled in its auto-ack
        # (see step 2); nothing more is asked of it.

        # 4. The auto-ack reached the server: the server's own view, over a
        # raw TCP connection of the same client (competing connections of one
        # client are allowed; nothing unsettled is left to be handed to it).
        raw = await RawLine.connect(host, int(port))
        reply = await raw.command(f"CONN;ACCESS_KEY={sub_key}")
        check_eq(reply, f"+PASS:{{clientId={sub_id},clientHash={sub_public}}}",
                 "raw TCP CONN with the subscriber's access key")
        deadline = time.monotonic() + ACK_VISIBLE_TIMEOUT
        while True:
            unacked = await raw.replay(sub_id, SECRET_EVENT, only_unacked=True)
            if not unacked:
                break
            if time.monotonic() > deadline:
                raise CheckFailed(
                    f"the SDK's auto-ack did not reach the server within {ACK_VISIBLE_TIMEOUT:g} s: "
                    f"REPLAY ONLY_UNACKED=true still lists {[r['idem'] for r in unacked]}")
            await asyncio.sleep(0.05)
        ok("REPLAY ONLY_UNACKED=true leaves the auto-acked event out")
        everything = await raw.replay(sub_id, SECRET_EVENT, only_unacked=False)
        check_eq([r["idem"] for r in everything], [secret_idem], "REPLAY without ONLY_UNACKED lists it")
        info = everything[0]["metadata"]["$internal"]["replay_info"]
        check_eq(info["wasAcknowledged"], True, "its replay_info says wasAcknowledged:true")
        stored_ciphertext(everything[0]["payload"])
        unacked_order = await raw.replay(sub_id, ORDER_EVENT, only_unacked=True)
        check_eq(unacked_order, [], "the manually acked events are settled too")

        # 5. replay(idem) returns the event decrypted.
        # NOTE (SDK quirk): SubscriptionDecorator.replay() calls
        # engine._replay_message, which does not exist (AttributeError); the
        # WebSocketSubscription from _ensure_subscription() calls the working
        # engine._replay(idem, name, key). And since the subscriber's
        # connection is stalled (step 2), the replay goes through a second
        # connection of the same client.
        replayer = EnSyncEngine(args.ws_url, sdk_options)
        engines.append(replayer)
        await within(replayer.create_client(sub_key, {"appSecretKey": sub_secret}),
                     "the second subscriber connection's create_client")
        replay_sub = replayer.subscribe(SECRET_EVENT, app_decrypt_key=sub_secret)
        replay_live = await within(replay_sub._ensure_subscription(), f"SUB {SECRET_EVENT} again")
        replayed = await within(replay_live.replay(secret_idem), f"replay({secret_idem})")
        check(isinstance(replayed, dict), "replay() returned a record", f"got {replayed!r}")
        check_eq(replayed["idem"], secret_idem, "replay() returned the same idem")
        check_eq(replayed["payload"], SECRET_PAYLOAD, "replay() returned the payload decrypted")
        check_eq(replayed["messageName"], SECRET_EVENT, "replay() returned the event name")
        check_eq(replayed["sender"], pub_id, "replay() returned the sender")
        check_eq(replayed["metadata"].get("REPLAYED"), True, "the replayed record is marked REPLAYED")
        check_eq(replayed["metadata"]["$internal"]["replay_info"]["wasAcknowledged"], True,
                 "the replayed record says wasAcknowledged:true")
    finally:
        if raw is not None:
            await raw.close()
        for engine in engines:
            # close() cancels the listener, stalled or not.
            await within(engine.close(), "closing an SDK connection", 5.0)
    print("PASS: the official SDK connected, received, auto-acked and replayed", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("keygen", help="print two Ed25519 key pairs as JSON")
    r = sub.add_parser("run", help="run the checks against a server")
    r.add_argument("--ws-url", required=True, help="ws://HOST:HTTP_PORT (the SDK adds /message)")
    r.add_argument("--tcp", required=True, help="HOST:PORT of the TCP listener")
    for who in ("subscriber", "publisher"):
        r.add_argument(f"--{who}-id", required=True)
        r.add_argument(f"--{who}-public", required=True)
        r.add_argument(f"--{who}-key", help="its access key (default: its id, as in open mode)")
    r.add_argument("--subscriber-secret", required=True)
    args = parser.parse_args()
    if args.mode == "keygen":
        keygen()
        return 0
    started = time.monotonic()
    try:
        asyncio.run(within(run(args), "the whole run", TOTAL_TIMEOUT))
    except CheckFailed as e:
        print(f"FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception:
        traceback.print_exc()
        print("FAILED: unexpected exception (above)", file=sys.stderr, flush=True)
        return 1
    print(f"took {time.monotonic() - started:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
