"""Intel VT-x as data and rules (Intel SDM Vol. 3C), pure Python."""
