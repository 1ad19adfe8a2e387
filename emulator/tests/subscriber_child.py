"""A subscriber process for churn tests: prints each message's data, never acks.

Usage: python -m emulator.tests.subscriber_child SUBSCRIPTION  (PUBSUB_EMULATOR_HOST set)
"""

from __future__ import annotations

import sys

from google.cloud import pubsub_v1


def main() -> None:
    subscriber = pubsub_v1.SubscriberClient()

    def hold(message: pubsub_v1.subscriber.message.Message) -> None:
        print(message.data.decode(), flush=True)

    print("ready", flush=True)
    subscriber.subscribe(sys.argv[1], hold).result()


if __name__ == "__main__":
    main()
