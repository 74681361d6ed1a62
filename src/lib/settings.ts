import { log } from "./log";

/**
 * A `[vars]` setting that must be a positive whole number. A missing or garbled value falls back to the
 * default with a warning: with `Number()` it would become NaN (or 0 for ""), and the task using it would
 * fail on every run (or act at once).
 */
export function positiveIntegerSetting(name: string, raw: string | undefined, fallback: number): number {
  const value = raw !== undefined && /^[1-9][0-9]*$/.test(raw) ? Number(raw) : NaN;
  if (Number.isSafeInteger(value)) return value;
  log("warn", "setting missing or not a positive integer; using the default", {
    setting: name,
    value: raw ?? null,
    fallback,
  });
  return fallback;
}
