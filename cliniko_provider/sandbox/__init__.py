"""A local Cliniko for development and tests: the attachment and patient API plus a strict S3.

Start it with `cliniko-sandbox` (or `python -m cliniko_provider.sandbox`); it prints
`Cliniko sandbox ready: http://127.0.0.1:PORT/v1`, the base URL to put in the Airflow
connection's host. From Python tests, use `cliniko_provider.sandbox.process.SandboxProcess`.

Answers chosen where Cliniko's own behaviour is not publicly confirmed:

- Missing or empty `User-Agent`: 400, plain text `Requires a user agent`.
- Bad or missing key (or a non-empty password): 401, plain text `HTTP Basic: Access denied.`
  with `WWW-Authenticate: Basic realm="Application"` (Rails' answer). Keys are accepted with
  or without their shard suffix, as Cliniko documents.
- Rate limit (sliding window per user, as Cliniko's: every key of a user counts in one window; a
  `--same-user-key NEW=KEY` makes NEW a second key of KEY's user): 429, plain text `Retry later`, headers
  `X-RateLimit-Reset` (epoch seconds when a request is allowed again) and `Retry-After`.
- Unknown or non-numeric ids: 404 `{"message": "Not found"}`. Creating an attachment for an
  unknown patient also answers 404 (the patient is looked up first, as for the presign).
- Storage limit (`--storage-limit`, per account, counting every attachment, archived or
  not): the presign answers 422 `{"message": "Validation Failed", "errors": {"base": "File
  storage limit reached for this account: ..."}}` once nothing is left, and otherwise caps
  the policy's `content-length-range` at what is left; creating an attachment whose upload
  would pass the limit answers the same 422.
- `upload_url` must be exactly the presign `url` + the uploaded `Key`, for an object in
  this account's bucket under that patient's temp prefix, not yet used for an attachment;
  otherwise 422 `{"message": "Validation Failed", "errors": {"temp_attachment_url": "is invalid"}}`.
- `GET /patient_attachments/{id}/content` serves the bytes (200) once processed, 404 before.
- Unknown `q[]` fields or operators, and malformed values: 422 with an `errors.q` message;
  `sort` takes several comma-separated `field[:desc]`; `order` other than `asc`/`desc`, and
  `per_page` outside the schema's 1 to 100, answer the same 422 (not clamped: a client kept
  within the schema here works on Cliniko whichever way Cliniko treats them).
- `OPTIONS` on an API path: 204 with `Allow` naming the methods it serves; another method: 405
  with the same `Allow`. `HEAD` answers as `GET` without a body.
- Patient fields of Cliniko's create schema the sandbox does not model (address, notes,
  pronouns, phone numbers...) are checked against that schema (422 `is invalid`), kept and
  echoed; fields the schema does not name are ignored (see `patient_fields`).
- Injected faults (`--fail-rate`, `--throttle-rate`) carry the header `X-Sandbox-Fault`;
  injected throttling answers 429 on the API and, as real S3 does, 503 `SlowDown` on S3.
- S3's answer to a POST carries `ETag`: the quoted MD5 of the object stored, as S3's does for a
  single-part upload; an attachment's `size` (and `filename`, `content_type`) are null until it is
  processed. Corruption faults, set through `POST /_sandbox/faults` and counted down as they strike:
  `corrupt_s3_objects` (the next uploads are stored with their first byte flipped, so the ETag and
  the bytes differ from what was sent), `corrupt_processed_sizes` (the next processed records show a
  `size` one byte more than their file) and `corrupt_processed_contents` (the next processed files
  have their first byte flipped, size unchanged).
"""
