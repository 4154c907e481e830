"""A service whose ping takes a while, to test that SIGTERM finishes the request in hand."""

import asyncio
import sys

from forgellm.config import load_settings
from forgellm.logs import configure_logging
from forgellm.schemas import PingReply
from forgellm.services.base import Service


class SlowService(Service):
    name = "publisher"  # borrow a real service's address

    async def ping(self, request, header):
        (self.settings.home / "in_handler").touch()  # tells the test the request is in hand
        await asyncio.sleep(1.0)
        return PingReply(service="slow", pid=self.pid, uptime_s=self.uptime(), version="slow")


if __name__ == "__main__":
    configure_logging("slow")
    sys.exit(asyncio.run(SlowService(load_settings()).run()))
