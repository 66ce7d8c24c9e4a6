"""``@task.cliniko_upload``: a TaskFlow function returns the uploads, the batch operator attaches them."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk.bases.decorator import DecoratedOperator, TaskDecorator, task_decorator_factory

try:
    from airflow.sdk.bases.decorator import determine_kwargs
except ImportError:  # Airflow 3.1 and 3.2 keep it in core
    from airflow.utils.operator_helpers import determine_kwargs  # type: ignore[no-redef,attr-defined]
from airflow.sdk.definitions._internal.types import SET_DURING_EXECUTION
from airflow.sdk.definitions.context import context_merge

from cliniko_provider.operators.cliniko import ClinikoBatchUploadOperator

if TYPE_CHECKING:
    from airflow.sdk import Context


class _ClinikoUploadDecoratedOperator(DecoratedOperator, ClinikoBatchUploadOperator):
    """Call the function, then upload what it returned with :class:`ClinikoBatchUploadOperator`.

    The function returns the batch operator's ``uploads``: a list of dicts with ``patient_id`` and
    ``file_path``, and optionally ``filename``, ``description`` and ``idempotency_key``. Its arguments are
    templated (as for ``@task``), and so are the batch operator's templated arguments (``audit_path``,
    ``verify``); what it returns is data and is not rendered again, so a description holding ``{{`` reaches
    Cliniko exactly as returned. Every other argument goes to the batch operator.

    :param python_callable: the decorated function.
    :param op_args: its positional arguments (templated).
    :param op_kwargs: its keyword arguments (templated).
    """

    template_fields: Sequence[str] = (
        *DecoratedOperator.template_fields,
        *(name for name in ClinikoBatchUploadOperator.template_fields if name != "uploads"),
    )
    template_fields_renderers: ClassVar[dict[str, str]] = {**DecoratedOperator.template_fields_renderers}
    custom_operator_name: str = "@task.cliniko_upload"

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Collection[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if "uploads" in kwargs:
            raise TypeError("@task.cliniko_upload takes no 'uploads': the decorated function returns them.")
        super().__init__(
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            uploads=SET_DURING_EXECUTION,
            **kwargs,
        )

    def execute(self, context: Context) -> Any:
        """Call the function for the uploads, then run the batch upload."""
        context_merge(context, self.op_kwargs)
        kwargs = determine_kwargs(self.python_callable, self.op_args, context)
        self.uploads = self.python_callable(*self.op_args, **kwargs)
        return ClinikoBatchUploadOperator.execute(self, context)


def cliniko_upload_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> TaskDecorator:
    """Wrap a function that returns uploads into a :class:`ClinikoBatchUploadOperator` task.

    Used as ``@task.cliniko_upload(cliniko_conn_id=..., wait_for_completion=True, ...)``, with any argument
    of the batch operator but ``uploads``; ``.expand()`` over the function's arguments maps one task per
    batch.

    :param python_callable: the function to decorate.
    :param kwargs: the batch operator's (and ``BaseOperator``'s) arguments.
    """
    return task_decorator_factory(
        python_callable=python_callable,
        decorated_operator_class=_ClinikoUploadDecoratedOperator,
        **kwargs,
    )
