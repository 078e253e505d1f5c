#!/usr/bin/env python3
"""The order saga's shipping participant in Python: serves the `schedule_shipment` step from
`shipping.commands`, answering on `saga.replies`, written from README.md, ARCHITECTURE.md, the
AsyncAPI document and JSON Schemas (events/contract/) and sagas/order.toml alone.

What it keeps of the contract (see README.md here for why each holds):
- every command is checked against the contract's JSON Schema of its `type`; one that breaks
  it, or any record that is not a command at all, goes to `saga.dlq` with the reason and gets
  no reply;
- a step ledger per (saga key, step) in SQLite: the step acts once; a new attempt, a
  redelivery, a repeat after a crash is answered from the ledger with the first outcome;
  a compensation without a forward step before it succeeds doing nothing and leaves a
  tombstone, after which a forward command is refused;
- the ledger is written before the reply is sent and the offset is committed after the broker
  acknowledged the reply, so a crash anywhere gives the same answer again, never a second act
  (no transactional outbox here, so a redelivered command is always answered again);
- a reply is keyed by the command's key on Kafka's default partitioner (murmur2), names the
  command's `message_id` as its `causation_id`, copies `saga_id`, `saga_type`, `step`,
  `action`, `attempt` and `key`, and continues the command's W3C trace (`traceparent`).

Settings (environment): KAFKA_BROKERS (127.0.0.1:9092), KAFKA_CLIENT_PROPERTIES (a
client.properties file, optional), TOPIC_PREFIX (""), PARTICIPANT_GROUP ("{prefix}shipping"),
COMMAND_TOPIC ("shipping.commands"), TOPIC_PARTITIONS (4, for the topics it creates when
missing), LEDGER_PATH ("shipping-ledger.sqlite3"), SHIPPING_DENIED_COUNTRIES ("AQ,BV"),
KAFKA_SESSION_TIMEOUT_MS (10000), CONTRACT_DIR (../../events/contract from this file).
"""

import datetime
import json
import os
import re
import signal
import sqlite3
import sys
import uuid
from pathlib import Path

import jsonschema
import referencing
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

STEP = "schedule_shipment"
SCHEMA_VERSION = 2
MAX_KEY_BYTES = 256
# A dead-letter copy keeps at most this much of the record's value and key (the broker's
# record limit is about 1 MB; the headers and the reason need room too).
MAX_COPY_BYTES = 512 * 1024
LATE_FORWARD = "the step was already compensated; a forward command after its compensation is refused"
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
# Reply ids derive from the command's id: a repeat for a redelivery keeps its id, and every
# other command's reply gets a new one.
REPLY_NAMESPACE = uuid.UUID("6f1c1b0e-93a5-4cde-9d43-1f0b2a7c5e11")


def env(name, default):
    return os.environ.get(name) or default


class Refused(Exception):
    """A record this participant cannot take: it goes to the dead-letter topic."""


class Contract:
    """The contract's JSON Schemas, by message type."""

    def __init__(self, directory):
        resources, self.by_type = [], {}
        for path in sorted(Path(directory, "schemas").glob("*.schema.json")):
            schema = json.loads(path.read_text())
            resources.append((schema["$id"], referencing.Resource.from_contents(schema)))
            self.by_type[path.name.removesuffix(".schema.json")] = schema
        self.registry = referencing.Registry().with_resources(resources)

    def check_command(self, command):
        name = command.get("type") if isinstance(command, dict) else None
        schema = self.by_type.get(name) if isinstance(name, str) else None
        if schema is None:
            schema = self.by_type["Command"]
        validator = jsonschema.Draft202012Validator(
            schema, registry=self.registry, format_checker=jsonschema.FormatChecker()
        )
        errors = sorted(validator.iter_errors(command), key=lambda e: list(e.path))
        if errors:
            where = "/".join(str(p) for p in errors[0].path) or "(the message)"
            raise Refused(f"breaks {name or 'Command'}'s schema at {where}: {errors[0].message}")
        # The schemas count characters; the contract counts the key's UTF-8 bytes.
        if len(command["key"].encode()) > MAX_KEY_BYTES:
            raise Refused(f"key: longer than {MAX_KEY_BYTES} bytes")


class Ledger:
    """The step ledger and the shipments, in one SQLite database: one transaction per command."""

    def __init__(self, path):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            """CREATE TABLE IF NOT EXISTS step_ledger (
                 saga_key TEXT NOT NULL, step TEXT NOT NULL,
                 forward_outcome TEXT,            -- 'succeeded' | 'failed' | NULL
                 refusal_reason TEXT,
                 compensated INTEGER NOT NULL DEFAULT 0,
                 PRIMARY KEY (saga_key, step))"""
        )
        self.db.execute(
            """CREATE TABLE IF NOT EXISTS shipments (
                 order_id TEXT PRIMARY KEY, country TEXT NOT NULL, items INTEGER NOT NULL)"""
        )

    def decide(self, command, act):
        """The outcome for `command`, (outcome, reason): from the ledger when the step was seen
        before, else from `act()` (run once, inside the transaction that records it)."""
        key, step = command["key"], command["step"]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.db.execute(
                "SELECT forward_outcome, refusal_reason, compensated FROM step_ledger"
                " WHERE saga_key = ? AND step = ?",
                (key, step),
            ).fetchone()
            outcome, reason, compensated = row if row else (None, None, 0)
            if command["action"] == "compensate":
                # Shipping's step has no compensation in the definitions; were one sent, it
                # would undo nothing here and leave a tombstone, as the contract asks.
                answer = ("succeeded", None)
                compensated = 1
            elif compensated:
                # The saga has moved on: never act after the undo (the outcome of a step that
                # ran before its compensation stays as it was).
                answer = ("failed", LATE_FORWARD)
                if outcome is None:
                    outcome, reason = answer
            elif outcome is not None:
                answer = (outcome, reason)
            else:
                answer = act(command)
                outcome, reason = answer
            self.db.execute(
                "INSERT INTO step_ledger (saga_key, step, forward_outcome, refusal_reason, compensated)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (saga_key, step) DO UPDATE SET"
                " forward_outcome = excluded.forward_outcome,"
                " refusal_reason = excluded.refusal_reason, compensated = excluded.compensated",
                (key, step, outcome, reason, compensated),
            )
            self.db.execute("COMMIT")
            return answer
        except BaseException:
            self.db.execute("ROLLBACK")
            raise


class Shipping:
    def __init__(self):
        prefix = env("TOPIC_PREFIX", "")
        self.command_topic = prefix + env("COMMAND_TOPIC", "shipping.commands")
        self.replies_topic = prefix + "saga.replies"
        self.dlq_topic = prefix + "saga.dlq"
        self.group = env("PARTICIPANT_GROUP", prefix + "shipping")
        self.denied = {
            c.strip().upper() for c in env("SHIPPING_DENIED_COUNTRIES", "AQ,BV").split(",") if c.strip()
        }
        here = Path(__file__).resolve().parent
        self.contract = Contract(env("CONTRACT_DIR", str(here / "../../events/contract")))
        self.ledger = Ledger(env("LEDGER_PATH", "shipping-ledger.sqlite3"))
        kafka = {"bootstrap.servers": env("KAFKA_BROKERS", "127.0.0.1:9092")}
        kafka.update(client_properties(os.environ.get("KAFKA_CLIENT_PROPERTIES")))
        self.create_topics(kafka, int(env("TOPIC_PARTITIONS", "4")))
        self.producer = Producer(
            {
                **kafka,
                "enable.idempotence": True,
                "acks": "all",
                # Kafka's default partitioner (Java's murmur2): a reply lands on the partition
                # number of its saga's other records. librdkafka's own default would not.
                "partitioner": "murmur2_random",
                "linger.ms": 5,
            }
        )
        self.consumer = Consumer(
            {
                **kafka,
                "group.id": self.group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "range",
                # A killed instance's partitions move after this long (librdkafka's default,
                # 45 s, would hold them that long; the Rust services take 10 s).
                "session.timeout.ms": int(env("KAFKA_SESSION_TIMEOUT_MS", "10000")),
            }
        )
        self.running = True

    def create_topics(self, kafka, partitions):
        admin = AdminClient(kafka)
        present = admin.list_topics(timeout=10).topics
        wanted = [
            NewTopic(t, num_partitions=partitions)
            for t in (self.command_topic, self.replies_topic, self.dlq_topic)
            if t not in present
        ]
        for topic, future in (admin.create_topics(wanted).items() if wanted else []):
            try:
                future.result()
            except KafkaException as e:
                if "TOPIC_ALREADY_EXISTS" not in str(e):
                    raise

    def schedule(self, command):
        payload = command["payload"]
        country = payload["address"]["country"]
        if country in self.denied:
            return ("failed", f"destination country {country} is on the deny-list")
        self.ledger.db.execute(
            "INSERT OR IGNORE INTO shipments (order_id, country, items) VALUES (?, ?, ?)",
            (payload["order_id"], country, sum(i["quantity"] for i in payload["items"])),
        )
        return ("succeeded", None)

    def handle(self, message):
        """One record: a reply, or a dead letter; the offset is committed after either is acked."""
        try:
            command = self.read(message)
            outcome, reason = self.ledger.decide(command, self.schedule)
            self.reply(message, command, outcome, reason)
        except Refused as refused:
            self.dead_letter(message, str(refused))
        self.producer.flush()
        self.consumer.commit(message=message, asynchronous=False)

    def read(self, message):
        try:
            command = json.loads(message.value() or b"")
        except (UnicodeDecodeError, ValueError) as e:
            raise Refused(f"not a JSON command: {e}") from e
        self.contract.check_command(command)
        if command["schema_version"] != SCHEMA_VERSION:
            raise Refused(f"schema_version {command['schema_version']} is not {SCHEMA_VERSION}")
        if command["step"] != STEP:
            raise Refused(f"step {command['step']} is not served here (only {STEP})")
        return command

    def reply(self, message, command, outcome, reason):
        names = command["replies"]
        name = names["success"] if outcome == "succeeded" else names.get("failure")
        if name is None:
            # The definition says the step cannot fail: nothing may answer it as refused.
            raise Refused(f"refused ({reason}), but the command names no failure reply")
        body = {
            "message_id": str(uuid.uuid5(REPLY_NAMESPACE, command["message_id"])),
            "saga_id": command["saga_id"],
            "causation_id": command["message_id"],
            "schema_version": SCHEMA_VERSION,
            "occurred_at": now(),
            "type": name,
            "saga_type": command["saga_type"],
            "step": command["step"],
            "action": command["action"],
            "attempt": command["attempt"],
            "key": command["key"],
            "outcome": outcome,
        }
        if outcome == "failed":
            body["reason"] = reason[:2000]
        self.producer.produce(
            self.replies_topic,
            key=command["key"].encode(),
            value=json.dumps(body).encode(),
            headers=[("traceparent", child_traceparent(message))],
        )

    def dead_letter(self, message, reason):
        value, key = message.value() or b"", message.key()
        headers = [
            ("dlq.id", str(uuid.uuid5(REPLY_NAMESPACE, f"{message.topic()}/{message.partition()}/{message.offset()}"))),
            ("dlq.reason", reason.encode("utf-8", "replace")[:2000]),
            ("dlq.source.topic", message.topic()),
            ("dlq.source.partition", str(message.partition())),
            ("dlq.source.offset", str(message.offset())),
            ("dlq.consumer", self.group),
            ("dlq.failed_at", now()),
        ]
        if len(value) > MAX_COPY_BYTES:
            headers.append(("dlq.payload.original_bytes", str(len(value))))
            value = value[:MAX_COPY_BYTES]
        if key is not None and len(key) > MAX_COPY_BYTES:
            headers.append(("dlq.key.original_bytes", str(len(key))))
            key = key[:MAX_COPY_BYTES]
        self.producer.produce(self.dlq_topic, key=key, value=value, headers=headers)

    def run(self):
        self.consumer.subscribe([self.command_topic])
        print(f"python-shipping: serving {STEP} on {self.command_topic} as {self.group}", flush=True)
        while self.running:
            message = self.consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                print(f"python-shipping: {message.error()}", file=sys.stderr, flush=True)
                continue
            self.handle(message)
        self.consumer.close()
        self.producer.flush()


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def child_traceparent(message):
    """The command's trace with a new span, or a new trace when it carried none readable."""
    try:
        headers = message.headers() or []
    except (SystemError, UnicodeDecodeError):
        # confluent-kafka cannot read a header whose name is not UTF-8 (it raises): such a
        # record's trace is unreadable, and a new one starts.
        headers = []
    for name, value in headers:
        if name == "traceparent" and value:
            try:
                found = TRACEPARENT.match(value.decode())
            except UnicodeDecodeError:
                found = None
            if found:
                return f"00-{found.group(1)}-{uuid.uuid4().hex[:16]}-{found.group(3)}"
    return f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"


def client_properties(path):
    """librdkafka properties from a client.properties file (`name=value`, `#`/`!` comments)."""
    if not path:
        return {}
    properties = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and line[0] not in "#!" and "=" in line:
            name, value = line.split("=", 1)
            properties[name.strip()] = value.strip()
    return properties


def main():
    shipping = Shipping()

    def stop(*_):
        shipping.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    shipping.run()


if __name__ == "__main__":
    main()
