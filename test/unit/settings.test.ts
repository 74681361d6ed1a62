import { afterEach, describe, expect, it, vi } from "vitest";
import { positiveIntegerSetting } from "../../src/lib/settings";

describe("positiveIntegerSetting", () => {
  afterEach(() => vi.restoreAllMocks());

  it("reads a positive decimal integer", () => {
    expect(positiveIntegerSetting("RELAY", "45", 30)).toBe(45);
    expect(positiveIntegerSetting("RELAY", "1", 30)).toBe(1);
  });

  it("falls back to the default, with a warning naming the setting, for a missing or bad value", () => {
    const warn = vi.spyOn(console, "warn").mockImplementation(() => {});
    for (const raw of [undefined, "", "0", "-5", "1.5", "30s", "1e3", " 30", "0x1E", "99999999999999999999"]) {
      expect(positiveIntegerSetting("RELAY", raw, 30), String(raw)).toBe(30);
    }
    expect(warn).toHaveBeenCalledTimes(10);
    expect(JSON.parse(String(warn.mock.calls[1]![0]))).toMatchObject({ level: "warn", setting: "RELAY", value: "", fallback: 30 });
  });
});
