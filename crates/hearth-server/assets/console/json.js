// JSON with exact integers. JavaScript's numbers hold integers exactly only up to
// 2^53: the API's bounds (the seed's maximum is 2^63 - 1) and any value a person types
// beyond that would come back rounded (9223372036854776000). Integers past that range
// are read as BigInt and written back digit for digit; everything else is plain JSON.

/** Integer literals that a double may not hold exactly (16 digits or more). */
const LONG_INTEGER = /\d{16,}/;

/** A marker no server text can hold by chance: NUL plus a fresh random tag. */
function marker() {
  const a = new Uint32Array(2);
  crypto.getRandomValues(a);
  return "\u0000" + a[0].toString(36) + a[1].toString(36) + ":";
}

/** JSON.parse, but an integer outside the safe range becomes a BigInt. */
export function parseJSON(text) {
  if (!LONG_INTEGER.test(text)) return JSON.parse(text);
  const tag = marker();
  const escaped = JSON.stringify(tag).slice(1, -1);
  let out = "", i = 0, last = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === '"') {
      // Skip the string, escapes included.
      for (i++; i < text.length && text[i] !== '"'; i++) if (text[i] === "\\") i++;
      i++;
    } else if (c === "-" || (c >= "0" && c <= "9")) {
      const m = /^-?\d+(\.\d+)?([eE][+-]?\d+)?/.exec(text.slice(i, i + 400));
      if (!m) return JSON.parse(text); // not JSON: let JSON.parse say why
      if (!m[1] && !m[2] && !Number.isSafeInteger(Number(m[0]))) {
        out += text.slice(last, i) + '"' + escaped + m[0] + '"';
        last = i + m[0].length;
      }
      i += m[0].length;
    } else {
      i++;
    }
  }
  out += text.slice(last);
  return JSON.parse(out, (_, v) => (typeof v === "string" && v.startsWith(tag) ? BigInt(v.slice(tag.length)) : v));
}

/** JSON.stringify that writes a BigInt as its exact digits. */
export function toJSON(value, indent) {
  let tag = null;
  const text = JSON.stringify(value, (_, v) => {
    if (typeof v !== "bigint") return v;
    tag = tag || marker();
    return tag + v.toString();
  }, indent);
  if (tag === null || text === undefined) return text;
  const quoted = JSON.stringify(tag).slice(0, -1); // `"\u0000…:` as written
  return text.split(quoted).map((part, n) => (n === 0 ? part : part.replace(/^(-?\d+)"/, "$1"))).join("");
}
