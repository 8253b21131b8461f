"""Forecast-driven autoscaling of the cloud tier.

The autoscaler scrapes the routers' request counters, keeps a history of the request and token
rates, forecasts them 15 minutes ahead (``forecast.py``: seasonal-naive, Holt-Winters, a small
LSTM; ``backtest.py`` says which predicts best) and publishes the cloud replicas that load needs
(``recommender.py``) as the gauge ``tandem_desired_cloud_replicas``, which a
HorizontalPodAutoscaler reads as an external metric.
"""
