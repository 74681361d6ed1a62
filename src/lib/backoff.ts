/**
 * Retry delay for the `attempts`-th delivery of a queue message (1 on the first): `baseSeconds`, then
 * doubling, never more than `capSeconds`.
 */
export function exponentialBackoff(attempts: number, baseSeconds: number, capSeconds: number): number {
  return Math.min(capSeconds, baseSeconds * 2 ** Math.max(0, attempts - 1));
}
