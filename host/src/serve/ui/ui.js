// host serve's UI: the little that helps beyond HTML. A filter takes effect as soon as it is
// chosen; without script, the Filter button does the same.
document.querySelectorAll("select[data-autosubmit]").forEach(function (select) {
  select.addEventListener("change", function () {
    select.form.submit();
  });
});
