// Server-sent events over a fetch() body. EventSource only issues GET requests, and the chat endpoint
// takes a POST with a JSON body, so the stream is read and split into events here.

/**
 * Yield the data payload of each event in an SSE byte stream.
 *
 * Events are separated by a blank line; the `data:` lines of one event are joined with "\n"
 * (the SSE specification's rule). Comment lines (":") and other fields are ignored.
 *
 * @param {ReadableStream<Uint8Array>} body - a fetch Response body.
 * @returns {AsyncGenerator<string>} each event's data, e.g. a JSON chunk or "[DONE]".
 */
export async function* readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      buffer = buffer.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const data = eventData(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (data !== null) yield data;
      }
      if (done) {
        const data = eventData(buffer);
        if (data !== null) yield data;
        return;
      }
    }
  } finally {
    // Stops the download when the caller leaves early; a no-op once the stream has ended.
    reader.cancel().catch(() => {});
  }
}

/** The joined `data:` lines of one event, or null when it has none. */
function eventData(event) {
  const lines = [];
  for (const line of event.split("\n")) {
    if (line.startsWith("data:")) lines.push(line.slice(line[5] === " " ? 6 : 5));
  }
  return lines.length ? lines.join("\n") : null;
}
