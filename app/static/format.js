// Pure helpers that turn numbers, token pieces and requests into text.

export function fmt(x) {
  if (typeof x !== "number" || !Number.isFinite(x)) return "–";
  const a = Math.abs(x);
  return x.toFixed(a >= 100 ? 1 : a >= 10 ? 2 : 3);
}

export const seconds = (x) => (typeof x === "number" ? (x < 1 ? `${(x * 1000).toFixed(0)} ms` : `${x.toFixed(2)} s`) : "–");

// Splits a chain's text into runs [{text, changed}], flagging the runs that came from changed tokens. The decoded
// text is the truth (single-token pieces may lack the spaces between words, or hold half a character); the
// pieces only place the marks.
export function segments(text, pieces, changed) {
  const out = [];
  const push = (part, isChanged) => { // adjacent changed tokens are one mark (a word of two tokens, not two boxes)
    const last = out[out.length - 1];
    if (last && last.changed === isChanged) last.text += part;
    else out.push({ text: part, changed: isChanged });
  };
  let cursor = 0;
  pieces.forEach((piece, i) => {
    let at = piece ? text.indexOf(piece, cursor) : -1;
    let part = piece;
    if (at < 0 && piece && piece.trim()) {
      part = piece.trim();
      at = text.indexOf(part, cursor);
    }
    if (at < 0) return;
    if (at > cursor) push(text.slice(cursor, at), false);
    push(part, Boolean(changed[i]));
    cursor = at + part.length;
  });
  if (cursor < text.length) push(text.slice(cursor), false);
  return out;
}

const shellQuote = (text) => `'${text.replace(/'/g, "'\\''")}'`;

// A curl command for the same request to POST /align; the key itself stays out (read from $SEA_API_KEY).
export function curlCommand(url, body, withKey) {
  const lines = [`curl -sS ${shellQuote(url)}`, "-H 'Content-Type: application/json'"];
  if (withKey) lines.push('-H "Authorization: Bearer $SEA_API_KEY"');
  lines.push(`-d ${shellQuote(JSON.stringify(body))}`);
  return lines.join(" \\\n  ");
}
