import { createMiddleware } from "hono/factory";
import { sign, verify } from "hono/jwt";
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

/** Verifies an HS256 token (the algorithm is pinned: a token claiming any other one is rejected). */
export async function verifyToken(secret: string, token: string): Promise<Caller> {
  let payload: Record<string, unknown>;
  try {
    payload = await verify(token, await verifyKeyFor(secret), { alg: "HS256", exp: true, nbf: true, iat: true });
  } catch {
    throw new AppError("UNAUTHENTICATED", "The token is malformed, expired or not signed with the expected key");
  }
  const { sub, role, exp } = payload;
  if (typeof exp !== "number") throw new AppError("UNAUTHENTICATED", "The token has no expiry");
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
