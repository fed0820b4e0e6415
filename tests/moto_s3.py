"""``moto_server`` with one fix, for the S3 tests: moto 5.2.1 names the CompleteMultipartUpload
reply's root ``CompleteMultipartUploadResponse`` (getmoto/moto#10055), which the AWS SDK inside
pyarrow takes for an error, so every upload above pyarrow's part size would fail.

    python tests/moto_s3.py PORT
"""

import sys

from moto.s3.responses import S3Response
from moto.server import main

_serialized = S3Response.serialized


def _fixed(self, result):
    status, headers, body = _serialized(self, result)
    if self.data.get("Action") == "CompleteMultipartUpload":
        body = body.replace("CompleteMultipartUploadResponse", "CompleteMultipartUploadResult")
    return status, headers, body


S3Response.serialized = _fixed
main(["-H", "127.0.0.1", "-p", sys.argv[1]])
