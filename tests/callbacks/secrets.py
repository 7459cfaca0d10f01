"""Valid ``whsec_`` secrets for the callback tests (base64 of 32 readable bytes)."""

from __future__ import annotations

# whsec_ + base64(b"cancelflow-rotated-test-secret!!")
ROTATED = "whsec_Y2FuY2VsZmxvdy1yb3RhdGVkLXRlc3Qtc2VjcmV0ISE="
# whsec_ + base64(b"someone-else-s-callback-secret!!"): a receiver holding the wrong one.
OTHER_SECRET = "whsec_c29tZW9uZS1lbHNlLXMtY2FsbGJhY2stc2VjcmV0ISE="
