"""Creates or deletes a SCRAM-SHA-512 credential on a Kafka cluster through the Admin API
(confluent-kafka, in the venv scripts/provision-kafka.sh installs): the tests revoke a
credential while a client is connected with it.

    python kafka-scram.py upsert USER CLIENT.properties BOOTSTRAP   # the password on stdin
    python kafka-scram.py delete USER CLIENT.properties BOOTSTRAP

CLIENT.properties: the admin identity's librdkafka properties. The password is read from
standard input so that it never shows in the process list.
"""

import sys

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AdminClient,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialDeletion,
    UserScramCredentialUpsertion,
)

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from importlib import import_module  # noqa: E402

read_properties = import_module("kafka-acls").read_properties


def main():
    if len(sys.argv) != 5 or sys.argv[1] not in ("upsert", "delete"):
        sys.exit(__doc__)
    action, user, properties_path, bootstrap = sys.argv[1:]
    admin = AdminClient({**read_properties(properties_path), "bootstrap.servers": bootstrap,
                         "log_level": 3})
    if action == "upsert":
        password = sys.stdin.readline().strip().encode()
        if not password:
            sys.exit("no password on standard input")
        change = UserScramCredentialUpsertion(
            user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192), password)
    else:
        change = UserScramCredentialDeletion(user, ScramMechanism.SCRAM_SHA_512)
    for future in admin.alter_user_scram_credentials([change]).values():
        try:
            future.result()
        except KafkaException as error:
            sys.exit(f"{action} SCRAM-SHA-512 credential of {user}: {error}")


if __name__ == "__main__":
    main()
