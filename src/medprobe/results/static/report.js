/* medprobe HTML report: table sorting and render checks (inlined by templates/report.html.j2) */
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    errors.push(String(e.message || e));
    document.body.setAttribute('data-errors', errors.join(' | '));
  });
  function key(cell) {
    if (!cell) return {e: true};
    var raw = cell.getAttribute('data-sort');
    var t = (raw !== null ? raw : cell.textContent).trim();
    if (t === '' || t === 'nan' || t === 'n/a') return {e: true};
    var x = Number(t);
    return isFinite(x) ? {n: x} : {s: t.toLowerCase()};
  }
  function compare(a, b, sign) {
    if (a.e && b.e) return 0;
    if (a.e) return 1;
    if (b.e) return -1;
    if (a.n !== undefined && b.n !== undefined) return sign * (a.n - b.n);
    if (a.n !== undefined) return -sign;
    if (b.n !== undefined) return sign;
    return sign * a.s.localeCompare(b.s);
  }
  function sortBy(th) {
    var table = th.closest('table');
    var body = table.tBodies[0];
    var idx = Array.prototype.indexOf.call(th.parentNode.children, th);
    var dir = th.getAttribute('aria-sort') === 'ascending' ? 'descending' : 'ascending';
    table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir);
    var sign = dir === 'ascending' ? 1 : -1;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) { return compare(key(a.cells[idx]), key(b.cells[idx]), sign); });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  window.medprobeSort = sortBy;
  document.querySelectorAll('table.sortable thead th').forEach(function (th) {
    th.tabIndex = 0;
    th.addEventListener('click', function () { sortBy(th); });
    th.addEventListener('keydown', function (e) { if (e.key === 'Enter') sortBy(th); });
  });
  function columnValues(table, idx) {
    return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return key(r.cells[idx]); })
      .filter(function (k) { return k.n !== undefined; }).map(function (k) { return k.n; });
  }
  function sorted(values, sign) {
    for (var i = 1; i < values.length; i++) if (sign * (values[i] - values[i - 1]) < 0) return false;
    return true;
  }
  function selftest() {
    var tables = document.querySelectorAll('table.sortable');
    for (var t = 0; t < tables.length; t++) {
      var ths = tables[t].querySelectorAll('thead th');
      for (var i = 0; i < ths.length; i++) {
        if (ths[i].getAttribute('data-type') !== 'number' || tables[t].tBodies[0].rows.length < 3) continue;
        ths[i].click();
        var up = sorted(columnValues(tables[t], i), 1);
        ths[i].click();
        var down = sorted(columnValues(tables[t], i), -1);
        return up && down ? 'pass' : 'fail: ' + (up ? 'descending' : 'ascending') + ' order wrong in table ' + t;
      }
    }
    return 'fail: no sortable numeric column with 3 rows';
  }
  window.addEventListener('load', function () {
    var imgs = Array.prototype.slice.call(document.images);
    var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
    var b = document.body;
    b.setAttribute('data-images', String(imgs.length));
    b.setAttribute('data-images-broken', String(broken));
    var overflow = imgs.filter(function (i) {  // a picture wider than its card would be cut off
      var box = (i.closest('figure') || b).getBoundingClientRect();
      return i.getBoundingClientRect().right > box.right + 1;
    }).length;
    b.setAttribute('data-images-overflow', String(overflow));
    b.setAttribute('data-tables', String(document.querySelectorAll('table').length));
    if (location.hash === '#selftest') b.setAttribute('data-selftest', selftest());
    b.setAttribute('data-render', broken ? 'broken-images' : 'ok');
  });
})();
