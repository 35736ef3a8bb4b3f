// A small markdown renderer for model output. Safety rule: every piece of source text is HTML-escaped before
// any markup is added, and link targets are limited to http(s)/mailto, so model output can never inject HTML.
// Covers what chat models write: fenced code (also unterminated, while it streams), headings, lists,
// block quotes, tables, rules, paragraphs; inline code, links, bold, italic, strike-through.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

export function renderMarkdown(source) {
  return renderBlocks(String(source).replace(/\r\n?/g, "\n").replace(/\u0000/g, "").split("\n"));
}

function startsBlock(line, next) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line) ||
    (line.includes("|") && next !== undefined && TABLE_SEP.test(next) && next.includes("-"));
}

function renderBlocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) { i++; continue; }
    if ((m = FENCE.exec(line))) {
      const fence = m[1], lang = m[2].replace(/[^\w+#.-]/g, "");
      const body = [];
      for (i++; i < lines.length; i++) {
        const close = lines[i].trim();
        if (close.startsWith(fence[0].repeat(fence.length)) && /^[`~]+$/.test(close)) { i++; break; }
        body.push(lines[i]);
      }
      out.push(codeBlock(body.join("\n"), lang));
    } else if ((m = HEADING.exec(line))) {
      out.push(`<h${m[1].length}>${inline(m[2])}</h${m[1].length}>`);
      i++;
    } else if (RULE.test(line)) {
      out.push("<hr>");
      i++;
    } else if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) { body.push(m[1]); i++; }
      out.push(`<blockquote>${renderBlocks(body)}</blockquote>`);
    } else if ((m = ITEM.exec(line))) {
      i = list(lines, i, out);
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      i = table(lines, i, out);
    } else {
      const para = [line];
      for (i++; i < lines.length && lines[i].trim() && !startsBlock(lines[i], lines[i + 1]); i++) para.push(lines[i]);
      out.push(`<p>${para.map((l) => inline(l.trim())).join("<br>")}</p>`);
    }
  }
  return out.join("");
}

function codeBlock(code, lang) {
  const label = lang ? `<span class="lang">${escapeHtml(lang)}</span>` : "<span class=\"lang\"></span>";
  return `<div class="code"><div class="code-head">${label}<button type="button" class="copy">copy</button></div>` +
    `<pre><code${lang ? ` data-lang="${escapeHtml(lang)}"` : ""}>${escapeHtml(code)}</code></pre></div>`;
}

// A list: items at the first item's indentation; deeper lines belong to the item before (nested lists too).
function list(lines, i, out) {
  const first = ITEM.exec(lines[i]);
  const indent = first[1].length, ordered = /\d/.test(first[2]);
  const items = [];
  while (i < lines.length) {
    const line = lines[i];
    const m = ITEM.exec(line);
    if (m && m[1].length === indent && /\d/.test(m[2]) === ordered) {
      items.push([m[3]]);
      i++;
    } else if (line.trim() && line.search(/\S/) > indent && items.length) {
      items[items.length - 1].push(line.slice(Math.min(line.search(/\S/), indent + 4)));
      i++;
    } else if (!line.trim() && i + 1 < lines.length && lines[i + 1].search(/\S/) >= indent &&
               (ITEM.test(lines[i + 1]) || lines[i + 1].search(/\S/) > indent)) {
      i++;  // a blank line inside the list
    } else {
      break;
    }
  }
  const start = ordered ? parseInt(first[2], 10) : 1;
  const tag = ordered ? "ol" : "ul";
  const body = items.map((item) => {
    const html = renderBlocks(item);
    return `<li>${item.length === 1 ? html.replace(/^<p>([\s\S]*)<\/p>$/, "$1") : html}</li>`;
  }).join("");
  out.push(`<${tag}${ordered && start !== 1 ? ` start="${start}"` : ""}>${body}</${tag}>`);
  return i;
}

function cells(row) {
  return row.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
}

function table(lines, i, out) {
  const head = cells(lines[i]);
  const aligns = cells(lines[i + 1]).map((c) => (c.endsWith(":") ? (c.startsWith(":") ? "center" : "right") : c.startsWith(":") ? "left" : ""));
  const cell = (tag, text, k) => `<${tag}${aligns[k] ? ` class="align-${aligns[k]}"` : ""}>${inline(text)}</${tag}>`;
  const rows = [];
  for (i += 2; i < lines.length && lines[i].includes("|") && lines[i].trim(); i++) rows.push(cells(lines[i]));
  out.push(`<div class="table"><table><thead><tr>${head.map((h, k) => cell("th", h, k)).join("")}</tr></thead><tbody>` +
    rows.map((r) => `<tr>${head.map((_, k) => cell("td", r[k] ?? "", k)).join("")}</tr>`).join("") + "</tbody></table></div>");
  return i;
}

// Inline markup over escaped text; code spans are set aside first so nothing inside them is interpreted.
function inline(text) {
  const spans = [];
  const keep = (html) => `\u0000${spans.push(html) - 1}\u0000`;
  let s = text.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, __, code) => keep(`<code>${escapeHtml(code.trim() || code)}</code>`));
  s = escapeHtml(s);
  s = s.replace(/\[([^\]\n]+)\]\(\s*([^)\s]+)\s*\)/g, (whole, label, url) => {
    // url is already escaped (quotes included), so it cannot leave the attribute
    if (!/^(https?:\/\/|mailto:)/i.test(url)) return label;
    return keep(`<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`);
  });
  s = s.replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/(^|[^*\w])\*(?=[^\s*])([^*]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
    .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
  for (let depth = 0; depth < 3 && s.includes("\u0000"); depth++) {  // a code span inside a link label
    s = s.replace(/\u0000(\d+)\u0000/g, (_, k) => spans[Number(k)]);
  }
  return s;
}
