// Every service reads time from a Clock handed to it, never from `new Date()`, so tests can pin it.
export interface Clock {
  now(): Date;
}

export const systemClock: Clock = { now: () => new Date() };

export function fixedClock(at: string | Date): Clock & { set(at: string | Date): void; advance(ms: number): void } {
  let current = new Date(at);
  return {
    now: () => new Date(current),
    set(next) {
      current = new Date(next);
    },
    advance(ms) {
      current = new Date(current.getTime() + ms);
    },
  };
}

export const DAY_MS = 86_400_000;

/** The UTC calendar date (YYYY-MM-DD) of an instant. */
export function utcDate(at: Date): string {
  return at.toISOString().slice(0, 10);
}
