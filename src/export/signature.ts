// Standard Webhooks signatures on every delivery to the data platform, so the platform can tell our exports
// from anyone else's POSTs: `webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`, keyed
// with the bytes behind `whsec_` in EXPORT_SIGNING_SECRET. While a secret is being rotated the variable holds
// several, separated by spaces ("whsec_new whsec_old"), and each delivery carries one signature per secret,
// so the platform verifies with whichever of them it knows.

const PREFIX = "whsec_";
// The Standard Webhooks specification asks for keys of 24 to 64 bytes.
const MIN_KEY_BYTES = 24;
const MAX_KEY_BYTES = 64;
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2}==)$/;

export interface WebhookHeaders {
  "webhook-id": string;
  "webhook-timestamp": string;
  "webhook-signature": string;
}

export interface DeliverySigner {
  /** The headers for one delivery of `body` (the exact bytes POSTed), signed at `at`. */
  sign(id: string, at: Date, body: string): Promise<WebhookHeaders>;
}

/** The key bytes of each secret in `value`, in order, or why `value` cannot sign (never quoting it). */
export function signingKeysOf(value: unknown): Uint8Array[] | { problem: string } {
  const secrets = typeof value === "string" ? value.trim().split(/\s+/).filter(Boolean) : [];
  if (secrets.length === 0) return { problem: "EXPORT_SIGNING_SECRET is not set" };
  const keys: Uint8Array[] = [];
  for (const [i, secret] of secrets.entries()) {
    const key = keyOf(secret);
    if (key === null) {
      const which = secrets.length > 1 ? ` (secret ${i + 1} of ${secrets.length})` : "";
      return {
        problem: `EXPORT_SIGNING_SECRET is malformed${which}: expected whsec_ and the base64 of ${MIN_KEY_BYTES} to ${MAX_KEY_BYTES} bytes`,
      };
    }
    keys.push(key);
  }
  return keys;
}

function keyOf(secret: string): Uint8Array | null {
  if (!secret.startsWith(PREFIX)) return null;
  const encoded = secret.slice(PREFIX.length);
  if (!BASE64.test(encoded)) return null;
  const key = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
  return key.length >= MIN_KEY_BYTES && key.length <= MAX_KEY_BYTES ? key : null;
}

/** A signer for every secret in `value`, or why there can be none. */
export async function deliverySigner(value: unknown): Promise<DeliverySigner | { problem: string }> {
  const keys = signingKeysOf(value);
  if ("problem" in keys) return keys;
  const cryptoKeys = await Promise.all(
    keys.map((key) => crypto.subtle.importKey("raw", key, { name: "HMAC", hash: "SHA-256" }, false, ["sign"])),
  );
  return {
    async sign(id, at, body) {
      const timestamp = String(Math.floor(at.getTime() / 1000));
      const signed = new TextEncoder().encode(`${id}.${timestamp}.${body}`);
      const signatures = await Promise.all(cryptoKeys.map((key) => crypto.subtle.sign("HMAC", key, signed)));
      return {
        "webhook-id": id,
        "webhook-timestamp": timestamp,
        "webhook-signature": signatures.map((mac) => `v1,${base64(new Uint8Array(mac))}`).join(" "),
      };
    },
  };
}

const base64 = (bytes: Uint8Array) => btoa(String.fromCharCode(...bytes));
