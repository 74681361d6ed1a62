import { DAY_MS } from "../lib/clock";

export interface IssueWindow {
  issueStartsAt: string | null;
  issueEndsAt: string | null;
}

/** A coupon is issuable from `issueStartsAt` through `issueEndsAt`, both inclusive; a missing end is open. */
export function isWithinIssueWindow(window: IssueWindow, at: Date): boolean {
  const t = at.getTime();
  if (window.issueStartsAt !== null && t < Date.parse(window.issueStartsAt)) return false;
  if (window.issueEndsAt !== null && t > Date.parse(window.issueEndsAt)) return false;
  return true;
}

export function expiryOf(issuedAt: Date, validDays: number): Date {
  return new Date(issuedAt.getTime() + validDays * DAY_MS);
}
