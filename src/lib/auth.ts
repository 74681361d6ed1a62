import { createMiddleware } from "hono/factory";
import { sign } from "hono/jwt";
import { AppError } from "./errors";
import type { AppEnv } from "../env";

export type Role = "user" | "admin";

export interface Caller {
  /** The user id for role "user"; an opaque id for an admin (admins need not be shop users). */
  sub: string;
  role: Role;
  /** The caller's user id, or null for an admin. */
  userId: number | null;
}

/** A user id as `sub`: decimal, and exact as a JS number (past 2^53 it would round to another user's id). */
const isUserId = (sub: string) => /^[1-9][0-9]{0,15}$/.test(sub) && Number.isSafeInteger(Number(sub));

export async function signToken(
  secret: string,
  claims: { sub: string; role: Role },
  expiresInSeconds: number,
  nowMs: number,
): Promise<string> {
  return sign({ ...claims, exp: Math.floor(nowMs / 1000) + expiresInSeconds }, secret, "HS256");
}

// Importing the HMAC key costs as much as checking a signature: each isolate imports it once per secret.
const verifyKeys = new Map<string, Promise<CryptoKey>>();

function verifyKeyFor(secret: string): Promise<CryptoKey> {
  let key = verifyKeys.get(secret);
  if (!key) {
    key = crypto.subtle.importKey("raw", new TextEncoder().encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["verify"]);
    key.catch(() => verifyKeys.delete(secret));
    verifyKeys.set(secret, key);
  }
  return key;
}

const utf8 = new TextEncoder();

/** base64url (no padding) to bytes; throws on anything atob refuses. */
function base64UrlBytes(part: string): Uint8Array<ArrayBuffer> {
  const binary = atob(part.replaceAll("-", "+").replaceAll("_", "/"));
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

const base64UrlJson = (part: string): unknown => JSON.parse(new TextDecoder().decode(base64UrlBytes(part)));

/**
 * Header segments already checked and signed with our key: every token this API signs carries the same
 * one, so it is parsed once per isolate. At most a few are kept.
 */
const goodHeaders = new Set<string>();
const MAX_GOOD_HEADERS = 8;

/** An HS256 JWS header as RFC 7515/7519 allow it here: alg pinned, typ absent or JWT, no crit. */
function checkHeader(part: string): void {
  if (goodHeaders.has(part)) return;
  const header = base64UrlJson(part) as Record<string, unknown> | null;
  if (typeof header !== "object" || header === null || Array.isArray(header)) throw new Error("header is not an object");
  if (header.alg !== "HS256") throw new Error("alg is not HS256");
  if ("typ" in header && (typeof header.typ !== "string" || header.typ.toUpperCase().replace(/^APPLICATION\//, "") !== "JWT")) {
    throw new Error("typ is not JWT");
  }
  if ("crit" in header) throw new Error("crit is not supported");
}

/**
 * Verifies a compact HS256 JWS and its time claims (exp required and in the future; nbf and iat, when
 * present, not in the future); returns the payload. The algorithm is pinned: any other, "none" included,
 * is refused. Done here rather than with hono/jwt, which costs several times more per request (it parses
 * the header every time and decodes base64 a character at a time): every authenticated request pays it.
 */
export async function verifyHs256(token: string, key: CryptoKey, nowSeconds: number): Promise<Record<string, unknown>> {
  const first = token.indexOf(".");
  const second = token.indexOf(".", first + 1);
  if (first <= 0 || second <= first + 1 || second === token.length - 1 || token.indexOf(".", second + 1) !== -1) {
    throw new Error("not a compact JWS");
  }
  checkHeader(token.slice(0, first));
  const signed = await crypto.subtle.verify("HMAC", key, base64UrlBytes(token.slice(second + 1)), utf8.encode(token.slice(0, second)));
  if (!signed) throw new Error("signature mismatch");
  // Only a header that came with our signature is remembered: unsigned tokens cannot fill the slots.
  if (goodHeaders.size < MAX_GOOD_HEADERS) goodHeaders.add(token.slice(0, first));
  const payload = base64UrlJson(token.slice(first + 1, second)) as Record<string, unknown> | null;
  if (typeof payload !== "object" || payload === null || Array.isArray(payload)) throw new Error("payload is not an object");
  const { exp, nbf, iat } = payload;
  if (typeof exp !== "number" || !Number.isFinite(exp) || exp <= nowSeconds) throw new Error("expired or no exp");
  if (nbf !== undefined && (typeof nbf !== "number" || !Number.isFinite(nbf) || nbf > nowSeconds)) throw new Error("not yet valid");
  if (iat !== undefined && (typeof iat !== "number" || !Number.isFinite(iat) || iat > nowSeconds)) throw new Error("issued in the future");
  return payload;
}

/** Verifies an HS256 token (the algorithm is pinned: a token claiming any other one is rejected). */
export async function verifyToken(secret: string, token: string): Promise<Caller> {
  let payload: Record<string, unknown>;
  try {
    payload = await verifyHs256(token, await verifyKeyFor(secret), Math.floor(Date.now() / 1000));
  } catch {
    throw new AppError("UNAUTHENTICATED", "The token is malformed, expired or not signed with the expected key");
  }
  const { sub, role } = payload;
  if (typeof sub !== "string" || sub.length === 0 || sub.length > 64) {
    throw new AppError("UNAUTHENTICATED", "The token has no valid subject");
  }
  if (role === "admin") return { sub, role, userId: null };
  if (role === "user" && isUserId(sub)) return { sub, role, userId: Number(sub) };
  throw new AppError("UNAUTHENTICATED", "The token has no valid role or subject");
}

/** Requires a valid bearer token; puts the caller on the context. */
export const authenticate = createMiddleware<AppEnv>(async (c, next) => {
  const header = c.req.header("Authorization") ?? "";
  const match = /^Bearer ([A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+)$/.exec(header);
  if (!match) throw new AppError("UNAUTHENTICATED", "Send Authorization: Bearer <token>");
  const secret = c.env.JWT_SECRET;
  if (!secret) throw new Error("JWT_SECRET is not configured");
  c.set("caller", await verifyToken(secret, match[1]!));
  await next();
});

export const requireAdmin = createMiddleware<AppEnv>(async (c, next) => {
  if (c.get("caller").role !== "admin") throw new AppError("FORBIDDEN", "This route is for admins");
  await next();
});

/**
 * The user a request acts for. A user acts for themselves (naming another user is 403);
 * an admin acts for anyone but must name them.
 */
export function actingUserId(caller: Caller, requested: number | undefined): number {
  if (caller.role === "admin") {
    if (requested === undefined) {
      throw new AppError("VALIDATION_FAILED", "An admin must name the userId", [
        { path: "userId", message: "Required for an admin" },
      ]);
    }
    return requested;
  }
  if (requested !== undefined && requested !== caller.userId) {
    throw new AppError("FORBIDDEN", "A user may act only on their own account");
  }
  return caller.userId!;
}

/** Scope of idempotency keys and other per-caller state. */
export function callerScope(caller: Caller): string {
  return `${caller.role}:${caller.sub}`;
}
