"""Applies an ACL plan of `sagactl provision kafka` through the Kafka Admin API (confluent-kafka,
which bundles librdkafka: rdkafka 0.39 has no ACL API), then waits until every broker enforces
it: the controller commits ACLs before each broker has replayed them, and right after
CreateAcls returns an allowed request can still be refused for a moment.

    python kafka-acls.py PLAN.json CLIENT.properties BOOTSTRAP [TIMEOUT_SECONDS]

CLIENT.properties: the admin identity's librdkafka properties (name=value lines). BOOTSTRAP:
every broker, comma separated (each one is asked for its view of the ACLs). Run through
scripts/provision-kafka.sh, which installs confluent-kafka first.
"""

import json
import sys
import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)


def read_properties(path):
    properties = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line[0] in "#!":
                continue
            if "=" not in line:
                sys.exit(f"{path}:{number}: expected name=value")
            name, value = line.split("=", 1)
            properties[name.strip()] = value.strip()
    return properties


def binding(entry):
    return AclBinding(
        ResourceType[entry["resource_type"]],
        entry["resource_name"],
        ResourcePatternType[entry["pattern_type"]],
        entry["principal"],
        "*",
        AclOperation[entry["operation"]],
        AclPermissionType.ALLOW,
    )


def key(acl):
    return (acl.restype, acl.name, acl.resource_pattern_type, acl.principal, acl.host,
            acl.operation, acl.permission_type)


def enforced_by(properties, broker, wanted):
    """The bindings of `wanted` that `broker` does not list yet (all of them when it does not
    answer). A fresh client bootstrapped to that broker alone asks it, not another one."""
    # Quiet: each short-lived client logs the requests it drops when closed.
    admin = AdminClient({**properties, "bootstrap.servers": broker, "log_level": 3})
    match_all = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, None, None,
                                 AclOperation.ANY, AclPermissionType.ANY)
    try:
        listed = admin.describe_acls(match_all, request_timeout=10).result()
    except KafkaException as error:
        print(f"{broker}: {error}", file=sys.stderr)
        return wanted
    return wanted - {key(acl) for acl in listed}


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    plan_path, properties_path, bootstrap = sys.argv[1:4]
    timeout = float(sys.argv[4]) if len(sys.argv) == 5 else 60.0
    with open(plan_path, encoding="utf-8") as plan_file:
        plan = json.load(plan_file)
    properties = read_properties(properties_path)
    acls = [binding(entry) for entry in plan["acls"]]
    admin = AdminClient({**properties, "bootstrap.servers": bootstrap})
    for acl, future in admin.create_acls(acls, request_timeout=30).items():
        try:
            future.result()
        except KafkaException as error:
            sys.exit(f"creating ACL {acl}: {error}")
    wanted = {key(acl) for acl in acls}
    began = time.monotonic()
    pending = bootstrap.split(",")
    while pending:
        pending = [broker for broker in pending if enforced_by(properties, broker, wanted)]
        if pending and time.monotonic() - began > timeout:
            sys.exit(f"brokers {', '.join(pending)} do not list every ACL after {timeout:.0f} s")
        if pending:
            time.sleep(0.2)
    print(f"{len(acls)} ACLs in force on {len(bootstrap.split(','))} brokers after "
          f"{time.monotonic() - began:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
