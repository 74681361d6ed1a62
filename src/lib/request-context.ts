import { AsyncLocalStorage } from "node:async_hooks";

// The request id of the work in progress, without threading it through every call: the Worker's request
// middleware (app.ts) runs each request inside it, and what the request starts (awaits, waitUntil work,
// outbox sends) inherits it. It does not cross a Durable Object RPC call or a queue: an object method takes
// the id as an optional last argument and runs its body in `withRequestId`, and a queue message carries it
// as `requestId` in its body (dispatchOutbox), which the consumer runs each message under.

const context = new AsyncLocalStorage<{ requestId: string }>();

/** The request id of the current work, if it has one. */
export function currentRequestId(): string | undefined {
  return context.getStore()?.requestId;
}

/** Runs `work` with `requestId` as the current request id; without one, in the context it was called in. */
export function withRequestId<T>(requestId: string | undefined, work: () => T): T {
  return requestId ? context.run({ requestId }, work) : work();
}

// The same shape the request-id middleware accepts from a client (app.ts: at most 64 characters).
const REQUEST_ID = /^[\w\-=]{1,64}$/;

/** The request id a queue message body carries, or undefined when it has none (or not a usable one). */
export function requestIdOf(body: unknown): string | undefined {
  const requestId = (body as { requestId?: unknown } | null)?.requestId;
  return typeof requestId === "string" && REQUEST_ID.test(requestId) ? requestId : undefined;
}
