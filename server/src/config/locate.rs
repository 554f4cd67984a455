//! The line locator: finds the line of a value in the YAML text from its path
//! (`services[0].backends[1].weight`), so a semantic error found after parsing still names its
//! line.

/// One path segment: a mapping key or a sequence index.
#[derive(Debug, PartialEq)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn parse_path(path: &str) -> Vec<Seg<'_>> {
    let mut segs = Vec::new();
    for part in path.split('.') {
        let (key, rest) = part.split_once('[').unwrap_or((part, ""));
        if !key.is_empty() {
            segs.push(Seg::Key(key));
        }
        for idx in rest.split('[') {
            if let Ok(n) = idx.trim_end_matches(']').parse() {
                segs.push(Seg::Index(n));
            }
        }
    }
    segs
}

/// A non-blank, non-comment line: 0-based number, indentation, content.
struct Line<'a> {
    no: usize,
    indent: usize,
    text: &'a str,
}

/// Finds the 1-based line of `path` (e.g. `services[0].backends[1].weight`) in block-style YAML
/// by re-scanning the text. Flow-style collections resolve to the line they start on. Returns
/// `None` when the path cannot be followed.
pub fn locate_line(text: &str, path: &str) -> Option<usize> {
    let lines: Vec<Line<'_>> = text
        .lines()
        .enumerate()
        .filter_map(|(no, l)| {
            let trimmed = l.trim_start();
            (!trimmed.is_empty() && !trimmed.starts_with('#') && trimmed != "---").then(|| Line {
                no,
                indent: l.len() - trimmed.len(),
                text: l,
            })
        })
        .collect();
    // The current node: index into `lines` and the column its content starts at.
    let (mut li, mut col) = (0usize, lines.first()?.indent);
    let mut found = lines.first()?.no;
    for seg in parse_path(path) {
        let first = lines.get(li)?;
        if first.text.len() > col && first.text[col..].starts_with(['{', '[']) {
            // Flow style: stop at the collection's line.
            return Some(found + 1);
        }
        match seg {
            Seg::Key(key) => {
                let mut hit = None;
                for (k, l) in lines.iter().enumerate().skip(li) {
                    if k > li && l.indent < col {
                        break;
                    }
                    let at = if k == li { col } else { l.indent };
                    if at != col {
                        continue;
                    }
                    let content = l.text.get(at..)?;
                    let content = content.trim_start_matches('"');
                    if let Some(rest) = content.strip_prefix(key) {
                        let rest = rest.trim_start_matches('"');
                        if rest.starts_with(':') {
                            hit = Some((k, at + (content.len() - rest.len()) + 1));
                            break;
                        }
                    }
                }
                let (k, after) = hit?;
                found = lines[k].no;
                let inline = lines[k].text[after..].trim_start();
                if !inline.is_empty() && !inline.starts_with('#') {
                    // Value on the same line.
                    li = k;
                    col = lines[k].text.len() - inline.len();
                } else {
                    li = k + 1;
                    col = lines.get(li)?.indent;
                }
            }
            Seg::Index(n) => {
                let mut count = 0usize;
                let mut hit = None;
                for (k, l) in lines.iter().enumerate().skip(li) {
                    let at = if k == li { col } else { l.indent };
                    if k > li && l.indent < col {
                        break;
                    }
                    if at != col {
                        continue;
                    }
                    if !l.text.get(at..)?.starts_with('-') {
                        break;
                    }
                    if count == n {
                        hit = Some(k);
                        break;
                    }
                    count += 1;
                }
                let k = hit?;
                found = lines[k].no;
                let item = lines[k].text.get(col + 1..)?;
                let trimmed = item.trim_start();
                if trimmed.is_empty() {
                    li = k + 1;
                    col = lines.get(li)?.indent;
                } else {
                    li = k;
                    col = lines[k].text.len() - trimmed.len();
                }
            }
        }
    }
    Some(found + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "\
listen: 127.0.0.1:50051
# comment
services:
  - name: web
    policy:
      algorithm: maglev
    backends:
      - id: a
        address: 10.0.0.1:80
      -
        id: b
        weight: 0
- name: x
";

    #[test]
    fn locate() {
        assert_eq!(locate_line(YAML, "listen"), Some(1));
        assert_eq!(locate_line(YAML, "services[0].name"), Some(4));
        assert_eq!(locate_line(YAML, "services[0].policy.algorithm"), Some(6));
        assert_eq!(
            locate_line(YAML, "services[0].backends[0].address"),
            Some(9)
        );
        assert_eq!(
            locate_line(YAML, "services[0].backends[1].weight"),
            Some(12)
        );
        assert_eq!(locate_line(YAML, "services[0].backends[2].weight"), None);
        let flow = "services:\n- {name: a, backends: [{id: x}]}\n";
        assert_eq!(locate_line(flow, "services[0].backends[0].id"), Some(2));
    }
}
