import { vi } from "vitest";

export type LogLine = Record<string, unknown>;

/**
 * The JSON lines written to the console (log, warn, error) from now until the mocks are restored
 * (`vi.restoreAllMocks()` in the test file's afterEach).
 */
export function captureLogLines(): LogLine[] {
  const lines: LogLine[] = [];
  const keep = (...args: unknown[]) => {
    try {
      lines.push(JSON.parse(String(args[0])));
    } catch {
      // not one of ours
    }
  };
  for (const method of ["log", "warn", "error"] as const) vi.spyOn(console, method).mockImplementation(keep);
  return lines;
}

/** The captured lines of one message. */
export const linesWith = (lines: LogLine[], msg: string) => lines.filter((line) => line.msg === msg);
