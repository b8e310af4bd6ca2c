"""``s3://[profile@]bucket/prefix``: objects in an S3 bucket (AWS, or any
service that speaks S3), through boto3.  Endpoint, region and credentials
come from boto3's standard configuration where the agent runs (``AWS_*``
variables, ``~/.aws/config`` and ``credentials``, the profile named in the
URL); dom0 never sees them.

- ``write``: one PUT, or for a stream beyond 16 MiB a multipart upload;
  either way the object appears whole, or not at all (a failed upload is
  aborted).  PUTs are atomic and durable when they return.
- ``create_exclusive`` (the lock): a conditional PUT, ``If-None-Match: *``.
  A service that ignored the condition would let two writers take the
  lock, so the first use checks that a second such PUT is refused.
- ``sizes``: a HEAD per object, all at once on ``connections`` threads.
- Throttling (503 SlowDown), server errors and dropped connections are
  ``Transient``: retry.py retries them with backoff (boto3's own retries
  are off, so that there is one retry policy).
"""
import concurrent.futures
import contextlib
import errno
import threading

from . import Store, StoreError, Transient

try:
    import boto3
    import botocore.exceptions as boto_errors
    from botocore.config import Config
except ImportError:
    boto3 = None

PUT_MAX = PART = 16 << 20
PROBE = "probe"  # the object the conditional-write check uses
TRANSIENT = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
             "ThrottlingException", "RequestLimitExceeded", "ConditionalRequestConflict", "OperationAborted"}
ABSENT = {"NoSuchKey", "404", "NotFound"}
DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
USAGE = "s3: takes the form s3://[profile@]bucket/prefix"


class Exists(StoreError):
    """A conditional PUT found the object there (412 Precondition Failed)."""


def open_url(url):
    if boto3 is None:
        raise StoreError("s3: the agent needs boto3 (install python3-boto3 where the agent runs)")
    netloc, _, prefix = url[len("s3://"):].partition("/")
    profile, _, bucket = netloc.rpartition("@")
    if not bucket:
        raise StoreError(USAGE)
    return S3Store(profile or None, bucket, prefix.strip("/"))


class S3Store(Store):
    connections = 32
    needs_sync = False

    def __init__(self, profile, bucket, prefix):
        self.bucket, self.prefix = bucket, prefix + "/" if prefix else ""
        self.location = "s3://%s%s/%s" % (profile + "@" if profile else "", bucket, prefix)
        config = Config(max_pool_connections=self.connections, retries={"total_max_attempts": 1},
                        user_agent_extra="qubes-wyng")
        with self._errors(""):
            self.s3 = boto3.session.Session(profile_name=profile).client("s3", config=config)
        self.heads = concurrent.futures.ThreadPoolExecutor(self.connections, thread_name_prefix="s3-head")
        self.probed, self.probe_lock = False, threading.Lock()

    @contextlib.contextmanager
    def _errors(self, name):
        """boto3's exceptions as the store's: absent, denied, transient."""
        try:
            yield
        except boto_errors.ClientError as e:
            raise self._client_error(e, name) from None
        except (boto_errors.ConnectionError, boto_errors.HTTPClientError, boto_errors.IncompleteReadError) as e:
            raise Transient(errno.EIO, "%s: %s" % (self.location, e)) from None
        except boto_errors.NoCredentialsError:
            raise StoreError(errno.EACCES, "no S3 credentials (set them up where the agent runs: "
                                           "~/.aws/credentials, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
                             self.location) from None
        except boto_errors.BotoCoreError as e:
            raise StoreError(errno.EIO, "%s: %s" % (self.location, e)) from None

    def _client_error(self, e, name):
        error, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
        code, status = str(error.get("Code", "")), meta.get("HTTPStatusCode", 0)
        if code in ("PreconditionFailed", "412"):
            return Exists(errno.EEXIST, "object exists", name)
        if code in ABSENT:
            return FileNotFoundError(errno.ENOENT, "no such object", name)
        if code == "NoSuchBucket":
            return StoreError(errno.ENOENT, "there is no bucket %s" % self.bucket, self.location)
        if code in DENIED:
            return PermissionError(errno.EACCES, "S3 refused access (%s)" % code, self.location)
        text = "S3 %s: %s" % (code or status, error.get("Message", ""))
        if code in TRANSIENT or status >= 500:
            return Transient(errno.EAGAIN, text, name)
        return StoreError(errno.EIO, text, name)

    def _key(self, name):
        return self.prefix + name

    # -- writing ------------------------------------------------------------------
    def make_root(self):
        with self._errors(""):
            self.s3.head_bucket(Bucket=self.bucket)

    def write(self, name, parts, durable=False):
        key = self._key(name)
        if isinstance(parts, list) and sum(map(len, parts)) < PUT_MAX:  # a sealed chunk: one PUT
            parts = b"".join(parts)
        if isinstance(parts, (bytes, bytearray, memoryview)):
            with self._errors(name):
                self.s3.put_object(Bucket=self.bucket, Key=key, Body=bytes(parts))
            return
        buf, upload = bytearray(), None
        try:
            for part in parts:
                buf += part
                if len(buf) >= PUT_MAX:
                    upload = upload or _Upload(self, key, name)
                    upload.add(bytes(buf))
                    buf.clear()
            with self._errors(name):
                if upload:
                    upload.add(bytes(buf))
                    upload.complete()
                else:
                    self.s3.put_object(Bucket=self.bucket, Key=key, Body=bytes(buf))
        except BaseException:
            if upload:
                upload.abort()
            raise

    def create_exclusive(self, name, data):
        self._check_conditional_writes()
        return self._put_if_absent(self._key(name), data, name)

    def _put_if_absent(self, key, data, name):
        try:
            with self._errors(name):
                self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exists:
            return False
        return True

    def _check_conditional_writes(self):
        with self.probe_lock:
            if self.probed:
                return
            key = self._key(PROBE)
            for _ in range(2):
                try:
                    created = self._put_if_absent(key, b"", PROBE)
                except Transient:
                    raise
                except StoreError as e:
                    raise StoreError(errno.ENOTSUP, "the S3 service does not support conditional writes "
                                                    "(If-None-Match), which the archive lock needs: %s" % e) from None
                if not created:
                    self.probed = True
                    return
            raise StoreError(errno.ENOTSUP, "the S3 service ignores conditional writes (If-None-Match), "
                                            "which the archive lock needs", self.location)

    def delete(self, name):
        with self._errors(name):
            self.s3.delete_object(Bucket=self.bucket, Key=self._key(name))

    # -- reading ------------------------------------------------------------------
    def open(self, name):
        with self._errors(name):
            return _Body(self, name, self.s3.get_object(Bucket=self.bucket, Key=self._key(name))["Body"])

    def read(self, name):
        with self.open(name) as body:
            return body.read()

    def size(self, name):
        try:
            with self._errors(name):
                return self.s3.head_object(Bucket=self.bucket, Key=self._key(name))["ContentLength"]
        except FileNotFoundError:
            return None

    def sizes(self, names):
        return [self.size(names[0])] if len(names) == 1 else list(self.heads.map(self.size, names))

    def list(self, prefix, recursive=True):
        folder = self._key(prefix.rstrip("/") + "/" if prefix else "")
        args = dict(Bucket=self.bucket, Prefix=folder, **({} if recursive else {"Delimiter": "/"}))
        with self._errors(prefix):
            for page in self.s3.get_paginator("list_objects_v2").paginate(**args):
                for item in page.get("Contents", ()):
                    if not item["Key"].endswith("/"):  # a folder marker (s3fs makes them)
                        yield item["Key"][len(self.prefix):]

    def close(self):
        self.heads.shutdown(wait=False)


class _Upload:
    """A multipart upload: the object appears when it completes."""

    def __init__(self, store, key, name):
        self.store, self.key, self.name, self.parts = store, key, name, []
        with store._errors(name):
            self.id = store.s3.create_multipart_upload(Bucket=store.bucket, Key=key)["UploadId"]

    def add(self, data):
        with self.store._errors(self.name):
            done = self.store.s3.upload_part(Bucket=self.store.bucket, Key=self.key, UploadId=self.id,
                                             PartNumber=len(self.parts) + 1, Body=data)
        self.parts.append({"PartNumber": len(self.parts) + 1, "ETag": done["ETag"],
                           **{k: v for k, v in done.items() if k.startswith("Checksum") and k != "ChecksumType"}})

    def complete(self):
        self.store.s3.complete_multipart_upload(Bucket=self.store.bucket, Key=self.key, UploadId=self.id,
                                                MultipartUpload={"Parts": self.parts})

    def abort(self):
        with contextlib.suppress(Exception):
            self.store.s3.abort_multipart_upload(Bucket=self.store.bucket, Key=self.key, UploadId=self.id)


class _Body:
    """An object's body as a reader: ``read(n)`` returns n bytes unless the
    object ends first."""

    def __init__(self, store, name, body):
        self.store, self.name, self.body = store, name, body

    def read(self, n=-1):
        with self.store._errors(self.name):
            if n < 0:
                return self.body.read()
            out = bytearray()
            while len(out) < n:
                data = self.body.read(n - len(out))
                if not data:
                    break
                out += data
            return bytes(out)

    def close(self):
        self.body.close()

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()
