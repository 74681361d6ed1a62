/**
 * Returns `work`, kept alive until it settles even if the client disconnects: the Workers runtime cancels
 * a request's pending work when its client goes away, except what is registered with waitUntil. Use it
 * for a pipeline that holds something (a reservation) between its steps.
 */
export function runToEnd<T>(ctx: Pick<ExecutionContext, "waitUntil">, work: Promise<T>): Promise<T> {
  ctx.waitUntil(work.then(
    () => undefined,
    () => undefined,
  ));
  return work;
}
