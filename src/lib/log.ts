import { currentRequestId } from "./request-context";

// Structured JSON lines, one per event, always with the request id when there is one: the caller's
// `requestId` field if it gives one, else the current request's (./request-context.ts), so one request
// can be followed through the Worker, its objects and its queue messages (README, "Logs").
type Level = "info" | "warn" | "error";

export function log(level: Level, msg: string, fields: Record<string, unknown> = {}): void {
  const { requestId: given, ...rest } = fields;
  const requestId = given ?? currentRequestId();
  const line = JSON.stringify({ level, msg, time: new Date().toISOString(), ...(requestId ? { requestId } : {}), ...rest });
  if (level === "error") console.error(line);
  else if (level === "warn") console.warn(line);
  else console.log(line);
}

export function describeError(error: unknown): Record<string, unknown> {
  if (error instanceof Error) return { error: error.name, message: error.message, stack: error.stack };
  return { error: String(error) };
}
